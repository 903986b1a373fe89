"""One-command study: every FFN variant at equal tokens, from scratch and continued from a dense checkpoint.

    python -m vffn_jax.study --preset cpu --seeds 3 --out runs/study

trains, in one process (compiles shared through JAX's persistent cache in OUT/compile_cache):

  OUT/dense_base/                        the shared dense checkpoint (seed 0, `steps` steps)
  OUT/scratch/<variant>/seed<k>/         each variant from scratch, `steps` steps
  OUT/continued/<variant>/seed<k>/       each variant initialised from dense_base (`train.init_from`), `steps`
                                         more steps: optimizer and schedule reset, new routers/experts fresh

for the variants dense, kloop2, kloop4, width_only, width_shared, depth_only, versatile_avg, versatile and moe
(seed k sets `train.seed`), then writes OUT/results.md (a table per regime and a sentence, computed from the
numbers, saying whether the paper's ordering held), OUT/results.json (every number) and the PNG plots
OUT/loss_curves.png and OUT/loops_per_layer.png. Re-running the same command skips finished runs (their
last checkpoint is at `steps` and their held-out loss is logged) and resumes unfinished ones.

Data order (`data.shuffle_seed`): dense_base and the scratch runs of seed k shuffle with seed k; the
continuation stage has its own order for every seed, `continued_shuffle_seed(k)` (a hash of
("continued", k) above 1,000,002, never a base/scratch seed), so no continued run replays the batches dense_base was trained on (before,
continued seed 0 used dense_base's shuffle seed and a fresh iterator, i.e. saw the same batches again
in the same order).

The width ablation: the ordering sentence uses `width_shared` (the paper's width sweep, one shared expert
plus top-k routed virtual experts; vffn_jax/ffn.py) and reports `width_only` (the k routed slices alone, a
strict sub-network of dense) beside it without making it part of the verdict.

Presets: `cpu` (configs/scales/study_cpu.json on the Python standard library's source, byte tokenizer; about
an hour on 2 CPU cores with the defaults), `micro` (a seconds-long smoke test of the pipeline), `354m`
(the paper's recipe unchanged: configs/scales/354m.json; set the data with --set data.path=...; on a pod) and
`gpu` (run when a GPU is available: dense, kloop4, width_shared, depth_only and versatile, both regimes, at a
45.3M-parameter bf16 model with OLMo's tokenizer, configs/scales/study_gpu.json; about an hour on one H100 by
a stated, unmeasured throughput).

The budget study (`--preset budget`; `budget-micro` for tests) asks how each variant's gap to dense moves with
the training budget and the width:

    python -m vffn_jax.study --preset budget --out runs/budget [--dry-run | --report-only]

trains dense, kloop4, depth_only, width_shared and versatile from scratch at every (d_model, tokens/param)
point of the preset's BudgetGrid (d_model 32 and 48; 1, 2.5, 7 and 20 tokens per dense parameter) with 3
seeds, in OUT/budget/d<w>/tpp<b>/<variant>/seed<k>, seed-major (seed 0's whole grid first). After every run it
rewrites OUT/results.md (gap to dense per point: mean ± sample std over seeds, n; a sentence per variant and
width on how the gap moves from the smallest to the largest budget, with a least-squares slope of the seed-level
gaps per 10x tokens/param and its standard error), OUT/results.json (`budget.points`,
`budget.trends`, every run) and OUT/gap_vs_budget.png, so an interrupted study has a report of what finished;
the same command continues it (finished runs are skipped, unfinished ones resume). --dry-run prints the grid,
which runs are finished and the estimated wall time (from the throughput the preset states); --report-only
rebuilds the report from the finished runs without training.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from vffn_jax import compile_cache
from vffn_jax import storage
from vffn_jax.study.budget import _data_text, run_budget_study
from vffn_jax.study.corpus import build_stdlib_corpus
from vffn_jax.study.plan import local_work_dir, plan
from vffn_jax.study.presets import PRESETS, REGIMES, VARIANTS
from vffn_jax.study.report import write_results
from vffn_jax.study.run import run_one


# --------------------------------------------------------------------------- driver


def run_study(preset: str, out: str | Path, *, seeds: int | None = None, variants: list[str] | None = None,
              regimes: list[str] | None = None, steps: int | None = None,
              overrides: dict[str, Any] | None = None, dry_run: bool = False, log=print) -> dict[str, Any]:
    """Plans, trains (skipping finished runs) and summarises the study; returns the results.json object
    (or, with `dry_run`, the plan)."""
    if PRESETS[preset].grid is not None:
        return run_budget_study(preset, out, seeds=seeds, variants=variants, overrides=overrides, dry_run=dry_run,
                                log=log)
    seeds = 3 if seeds is None else seeds
    out = storage.check_writable(out, "--out")
    p = PRESETS[preset]
    variants = list(p.variants or VARIANTS) if variants is None else variants
    regimes = list(REGIMES) if regimes is None else regimes
    corpus = None
    if p.corpus == "stdlib":
        corpus = build_stdlib_corpus(local_work_dir(out) / "corpus", p.corpus_max_files,
                                     holdout_files=p.holdout_files)
    specs = plan(preset, out, seeds=seeds, variants=variants, regimes=regimes, steps=steps,
                 user_overrides=overrides, corpus=corpus)
    if dry_run:
        return {"runs": [{"regime": s.regime, "variant": s.variant, "seed": s.seed, "workdir": str(s.workdir),
                          "config": s.cfg.to_dict()} for s in specs]}

    import jax

    compile_cache.enable("auto", out)  # <out>/compile_cache unless the caller configured one (e.g. tests)
    devices = jax.devices()[:1] if p.single_device else None
    t0 = time.perf_counter()
    base, results = None, []
    for i, spec in enumerate(specs):
        log(f"study: run {i + 1}/{len(specs)}: {spec.regime}/{spec.variant}/seed{spec.seed} "
            f"({time.perf_counter() - t0:.0f} s elapsed)")
        r = run_one(spec, devices, log=log)
        if spec.regime == "base":
            base = r
        else:
            results.append(r)
    cfg0 = specs[0].cfg
    m, t = cfg0.model, cfg0.train
    meta = {
        "preset": preset, "scale": p.scale, "seeds": list(range(seeds)), "variants": variants, "regimes": regimes,
        "steps": t.steps, "batch_size": t.batch_size, "seq_len": t.seq_len,
        "tokens_per_run": t.steps * t.batch_size * t.seq_len,
        "eval_tokens": cfg0.run.eval_batches * t.batch_size * t.seq_len,
        "model": f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, d_ff {m.d_ff}, vocab {m.vocab_size}, "
                 f"E={m.n_experts} top-{m.top_k}, L={m.max_depth}, {m.dtype}; lr {t.lr}, warmup {t.warmup_frac:.0%}",
        "data": _data_text(p, cfg0, corpus),
        "device": f"{len(devices or jax.devices())} x {jax.devices()[0].device_kind}",
        "study_wall_s_this_invocation": time.perf_counter() - t0,
    }
    doc = write_results(out, results, meta, base, variants)
    log(f"study: wrote {out / 'results.md'} ({time.perf_counter() - t0:.0f} s)")
    for regime, verdict in doc["ordering"].items():
        log(f"study: {regime}: {verdict['sentence']}")
    return doc
