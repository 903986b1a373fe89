"""The budget study: gap to dense vs tokens/param at several widths, planned, run and reported after every run."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any
from vffn_jax import compile_cache
from vffn_jax import storage
from vffn_jax import config as config_lib
from vffn_jax.config import Config, ConfigError
from vffn_jax.study.corpus import build_stdlib_corpus
from vffn_jax.study.plan import RunSpec, local_work_dir, study_overrides
from vffn_jax.study.presets import BUDGET_VARIANTS, PRESETS, Preset, VARIANTS
from vffn_jax.study.report import _trend_sentence, write_budget_results
from vffn_jax.study.run import collect, is_finished, run_one


# --------------------------------------------------------------------------- the budget study


def budget_points(preset_name: str, user_overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """[{width, tokens_per_param (asked), params (dense, analytic total), steps, tokens, tpp (actual)}] of a
    budget preset, in grid order (width, then budget)."""
    from vffn_jax.perf import flops as flops_lib

    preset = PRESETS[preset_name]
    grid = preset.grid
    if grid is None:
        raise ConfigError(f"preset {preset_name!r} is not a budget study")
    over = {**preset.overrides, **(user_overrides or {})}
    points = []
    for w in grid.widths:
        cfg = config_lib.load_config(preset.scale, "dense", {**over, **grid.shape(w)})
        params = flops_lib.analytic_params(cfg.model)
        per_step = cfg.train.batch_size * cfg.train.seq_len
        for tpp in grid.tokens_per_param:
            steps = max(1, round(tpp * params / per_step))
            points.append({"width": w, "tokens_per_param": tpp, "params": params, "steps": steps,
                           "tokens": steps * per_step, "tpp": steps * per_step / params})
    return points


def budget_workdir(out, width: int, tpp: float, variant: str, seed: int) -> Path:
    return storage.as_path(out) / "budget" / f"d{width}" / f"tpp{tpp:g}" / variant / f"seed{seed}"


def plan_budget(preset_name: str, out, *, seeds: int | None = None, variants: list[str] | None = None,
                user_overrides: dict[str, Any] | None = None, corpus: tuple[Path, float] | None = None
                ) -> list[RunSpec]:
    """Every run of a budget study, seed-major (all of seed 0's grid, then seed 1's, ...; within a seed budgets
    ascending, then widths, then variants), so an interrupted study has whole seeds of the grid to report."""
    preset = PRESETS[preset_name]
    grid = preset.grid
    variants = list(preset.variants or BUDGET_VARIANTS) if variants is None else variants
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {v!r}; choose from {list(VARIANTS)}")
    if "dense" not in variants:
        raise ConfigError("--variants: the budget study needs dense (every gap is measured against it)")
    seeds = grid.seeds if seeds is None else seeds
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    out = storage.as_path(out)
    user = dict(user_overrides or {})
    points = budget_points(preset_name, user)
    runs = []
    for seed in range(seeds):
        for pt in sorted(points, key=lambda p: (p["tokens_per_param"], p["width"])):
            over = study_overrides(preset, out, pt["steps"], {**grid.shape(pt["width"]), **user}, corpus,
                                   pt["steps"])
            for variant in variants:
                preset_variant, extra = VARIANTS[variant]
                o = {**over, **extra, "train.seed": seed, "data.shuffle_seed": seed}
                cfg = dataclasses.replace(config_lib.load_config(preset.scale, preset_variant, o), variant=variant)
                runs.append(RunSpec("budget", variant, seed, cfg,
                                    budget_workdir(out, pt["width"], pt["tokens_per_param"], variant, seed),
                                    width=pt["width"], tpp=pt["tokens_per_param"]))
    return runs


def estimate_seconds(preset_name: str, spec: RunSpec) -> float | None:
    """--dry-run's wall-time estimate of one run (None when the preset states no throughput for its width)."""
    grid = PRESETS[preset_name].grid
    tps = grid.tokens_per_sec.get(spec.width, {}).get(spec.variant)
    if not tps:
        return None
    t = spec.cfg.train
    eval_tokens = spec.cfg.run.eval_batches * t.batch_size * t.seq_len
    return grid.overhead_s + (t.steps * t.batch_size * t.seq_len + eval_tokens / 3) / tps


def describe_budget_plan(preset_name: str, specs: list[RunSpec], finished: set[str] | None = None) -> list[str]:
    """The grid as text lines: one per (width, budget) with its steps, tokens, seeds and estimated time, and
    the total (what --dry-run prints)."""
    preset = PRESETS[preset_name]
    grid = preset.grid
    finished = finished or set()
    variants = sorted({s.variant for s in specs}, key=list(VARIANTS).index)
    lines = [f"budget study ({preset_name}): widths {list(grid.widths)} x tokens/param "
             f"{[f'{x:g}' for x in grid.tokens_per_param]} x variants {variants} "
             f"x seeds; scratch only; {len(specs)} runs ({len(finished)} finished)",
             "  width  params(dense)  tok/param  steps   tokens      seeds  est. s (all variants x seeds)"]
    total, left, missing = 0.0, 0.0, False
    by_point: dict[tuple[int, float], list[RunSpec]] = {}
    for s in specs:
        by_point.setdefault((s.width, s.tpp), []).append(s)
    from vffn_jax.perf import flops as flops_lib

    for (w, tpp), runs in sorted(by_point.items()):
        est = [estimate_seconds(preset_name, s) for s in runs]
        missing |= any(e is None for e in est)
        sec = sum(e for e in est if e is not None)
        total += sec
        left += sum(e for e, s in zip(est, runs) if e is not None and str(s.workdir) not in finished)
        t = runs[0].cfg.train
        dense_cfg = dataclasses.replace(runs[0].cfg.model, ffn="dense")
        params = flops_lib.analytic_params(dense_cfg)
        tokens = t.steps * t.batch_size * t.seq_len
        lines.append(f"  {w:5d}  {params:13,d}  {tpp:9g}  {t.steps:5d}  {tokens:11,d}  "
                     f"{len({s.seed for s in runs}):5d}  {sec:9.0f}  (actual tokens/param {tokens / params:.2f})")
    lines.append(f"estimated wall time: {total:,.0f} s = {total / 3600:.2f} h in all, {left:,.0f} s = "
                 f"{left / 3600:.2f} h still to run" + (" (some widths have no stated throughput: not counted)"
                                                        if missing else ""))
    if grid.measured_on:
        lines.append(f"  (throughput: {grid.measured_on})")
    if preset.note:
        lines.append(f"  {preset.note}")
    return lines


def collect_budget(spec: RunSpec) -> dict[str, Any]:
    from vffn_jax.perf import flops as flops_lib

    r = collect(spec)
    params_dense = flops_lib.analytic_params(dataclasses.replace(spec.cfg.model, ffn="dense"))
    r.update({"width": spec.width, "tokens_per_param": spec.tpp, "params_dense": params_dense,
              "tpp": r["tokens"] / params_dense})
    r.pop("curve", None)  # the budget study reports held-out losses only; metrics.jsonl keeps the curve
    return r


def _budget_meta(preset_name: str, specs: list[RunSpec], corpus, finished: int, devices_text: str) -> dict[str, Any]:
    p = PRESETS[preset_name]
    cfg0 = specs[0].cfg
    m, t = cfg0.model, cfg0.train
    return {
        "preset": preset_name, "scale": p.scale, "mode": "budget",
        "widths": list(p.grid.widths), "tokens_per_param": list(p.grid.tokens_per_param),
        "seeds": sorted({s.seed for s in specs}), "variants": sorted({s.variant for s in specs},
                                                                      key=list(VARIANTS).index),
        "planned": len(specs), "finished": finished,
        "batch_size": t.batch_size, "seq_len": t.seq_len,
        "eval_tokens": cfg0.run.eval_batches * t.batch_size * t.seq_len,
        "model": f"d_model per the grid (d_ff = {p.grid.ff_mult} d_model, head dim {p.grid.head_dim}), "
                 f"{m.n_layers} layers, vocab {m.vocab_size}, E={m.n_experts} top-{m.top_k}, L={m.max_depth}, "
                 f"{m.dtype}; batch {t.batch_size} x {t.seq_len}; lr {t.lr} (the same at every budget), warmup "
                 f"{t.warmup_frac:.0%}, cosine to {t.final_lr_frac:g} x; Gumbel tau decays over each run's own length",
        "data": _data_text(p, cfg0, corpus),
        "device": devices_text,
    }


def _data_text(p: Preset, cfg0: Config, corpus) -> str:
    if not corpus:
        return f"data.path={cfg0.data.path!r}, tokenizer {cfg0.data.tokenizer}"
    tok = "byte tokenizer (vocab 257)" if cfg0.data.tokenizer == "byte" else f"tokenizer {cfg0.data.tokenizer}"
    return (f"Python {sys.version.split()[0]} standard library source ({corpus[0].name}: one document per "
            f".py file, {p.holdout_files:.0%} of the files held out whole, evaluated on shuffled ~2 KB pieces "
            f"of them), {tok}")


def run_budget_study(preset: str, out, *, seeds: int | None = None, variants: list[str] | None = None,
                     overrides: dict[str, Any] | None = None, dry_run: bool = False, report_only: bool = False,
                     log=print) -> dict[str, Any]:
    """Plans the budget grid, trains it (skipping finished runs, resuming unfinished ones) and rewrites
    results.md/json and gap_vs_budget.png after every run, so an interrupted study always has a report of
    what finished; re-running the same command continues where it stopped. `report_only`: train nothing,
    report the finished runs. `dry_run`: print the grid and the time estimate."""
    out = storage.check_writable(out, "--out")
    p = PRESETS[preset]
    corpus = None
    if p.corpus == "stdlib":
        corpus = build_stdlib_corpus(local_work_dir(out) / "corpus", p.corpus_max_files,
                                     holdout_files=p.holdout_files)
    specs = plan_budget(preset, out, seeds=seeds, variants=variants, user_overrides=overrides, corpus=corpus)
    if dry_run or report_only:
        done = {str(s.workdir) for s in specs if is_finished(s)}
        if dry_run:
            for line in describe_budget_plan(preset, specs, done):
                log(line)
            return {"runs": [{"regime": s.regime, "variant": s.variant, "seed": s.seed, "width": s.width,
                              "tokens_per_param": s.tpp, "steps": s.cfg.train.steps, "workdir": str(s.workdir),
                              "finished": str(s.workdir) in done,
                              "estimated_s": estimate_seconds(preset, s), "config": s.cfg.to_dict()} for s in specs]}
        results = [collect_budget(s) for s in specs if str(s.workdir) in done]
        doc = write_budget_results(out, results, _budget_meta(preset, specs, corpus, len(results),
                                                              "(report only: see each run's metrics)"))
        log(f"study: wrote {out / 'results.md'} from {len(results)} finished of {len(specs)} runs")
        return doc

    import jax

    compile_cache.enable("auto", out)
    devices = jax.devices()[:1] if p.single_device else None
    device_text = f"{len(devices or jax.devices())} x {jax.devices()[0].device_kind}"
    for line in describe_budget_plan(preset, specs, {str(s.workdir) for s in specs if is_finished(s)}):
        log(line)
    t0 = time.perf_counter()
    results = []
    for i, spec in enumerate(specs):
        log(f"study: run {i + 1}/{len(specs)}: d{spec.width}/tpp{spec.tpp:g}/{spec.variant}/seed{spec.seed} "
            f"({time.perf_counter() - t0:.0f} s elapsed)")
        run_one(spec, devices, log=log)
        results.append(collect_budget(spec))
        doc = write_budget_results(out, results, _budget_meta(preset, specs, corpus, len(results), device_text))
    log(f"study: wrote {out / 'results.md'} ({time.perf_counter() - t0:.0f} s)")
    for t in doc["budget"]["trends"]:
        log(f"study: {_trend_sentence(t)}")
    return doc
