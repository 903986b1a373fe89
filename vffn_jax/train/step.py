"""The loss, the jitted train and eval steps, and gradient accumulation.

The step is a pure `jax.jit` function of (params, opt_state, batch, step) with explicit shardings; the
Gumbel temperature and the noise key are pure functions of the step, so resume is exact.
"""
from __future__ import annotations

import collections
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vffn_jax.config import EXPERT_KINDS, Config, TrainConfig, tau_at
from vffn_jax.parallel import sharding as shd
from vffn_jax.train.optimizer import lr_schedule


# --------------------------------------------------------------------------- loss and steps


def forward_loss(graphdef, params, batch, cfg: Config, *, train: bool, tau=1.0, rng=None, row_ids=None,
                 expert_load=None):
    """Cross-entropy (+ balance/z losses in training); returns (total, (ce, aux)).

    `row_ids`: the rows' indices in the global batch when `batch` is a microbatch (`split_microbatches`),
    so each token gets the depth-router noise it gets in the whole batch. `expert_load [layers, E]`:
    the f_i of the balance loss `E * sum_i f_i P_i` (a constant) instead of this batch's own."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits, aux = nnx.merge(graphdef, params)(inputs, train=train, tau=tau, rng=rng, row_ids=row_ids)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    total = ce
    if "balance_loss" in aux:
        if expert_load is None:
            balance = aux["balance_loss"]
        else:
            load = jax.lax.stop_gradient(expert_load)
            balance = load.shape[-1] * jnp.sum(load * aux["router_prob"], axis=-1)
        total = total + cfg.train.balance_coef * balance.mean()
        total = total + cfg.train.z_loss_coef * aux["z_loss"].mean()
    return total, (ce, aux)


def summarize_aux(aux: dict[str, jax.Array], max_depth: int) -> dict[str, jax.Array]:
    """Scalars (and small per-layer arrays) for logging from the stacked per-layer aux."""
    out = {}
    if "depth" in aux:
        depth = aux["depth"]  # [layers, B, T]
        out["mean_depth"] = depth.mean()
        out["mean_alpha"] = aux["alpha"].mean()
        out["depth_hist"] = jax.nn.one_hot(depth - 1, max_depth).mean(axis=(1, 2))  # [layers, L]
        out["depth_entropy"] = aux["depth_entropy"].mean()
    if "expert_load" in aux:
        load = aux["expert_load"]  # [layers, E]
        out["expert_load"] = load
        out["router_entropy"] = aux["router_entropy"].mean()
        out["balance_loss"] = aux["balance_loss"].mean()
        out["z_loss"] = aux["z_loss"].mean()
    return out


# --------------------------------------------------------------------------- gradient accumulation
#
# `train.grad_accum = N` runs the global batch `[B, T+1]` as N microbatches of B/N rows in a
# `lax.scan`, sums the gradients and takes one optimizer step. Microbatch j holds the rows
# j, j+N, j+2N, ... (a strided split: `[B] -> [B/N, N]`, transposed). The batch is sharded over
# (data, fsdp) in contiguous blocks of B/D rows; B % (N*D) == 0 makes each device's block a whole
# number of [B/N, N] tiles, so every microbatch takes B/(N*D) rows from each device's own block and the
# split moves no data (checked in tests/test_grad_accum.py: no collective on the batch).
#
# What equals the one-batch step: every per-token mean is a mean of equal-sized microbatch means
# (cross-entropy, z-loss, router/depth entropies, mean depth/alpha, depth histogram, expert load f_i,
# mean router probability P_i), so the loss, its gradient and the logged statistics match up to f32
# rounding; the depth router's Gumbel noise is a function of (step, layer, global row, position)
# (`ffn.gumbel_noise`), so every token samples the same depth. The logged balance loss is formed
# after the scan from the accumulated f and P, so it is the whole batch's `E * sum_i f_i P_i`.
#
# The *gradient* of the Switch balance loss needs care. With f a constant (stop_gradient) the loss
# is linear in P, so its exact gradient is `E * sum_i f_i(batch) dP_i`: every microbatch needs the
# whole batch's f of every layer, and layer l's f depends on every layer below it, so it is known only
# after a forward pass over all microbatches. Two modes:
#   * `train.grad_accum_exact_balance=false` (default): each microbatch uses its own f_i(j). The gradient
#     then differs from the one-batch gradient by `balance_coef * E/N * sum_j sum_i (f_i - f_i(j)) dP_i(j)`
#     (the sampling spread of the microbatch loads, times balance_coef). Measured on the test shapes
#     (tests/test_grad_accum.py: 8 x 32 tokens, N=4, first step): the whole gradient's relative error is
#     2.6e-7 at balance_coef 1e-5 (f32 rounding alone: 2.3e-7) and 5.4e-4 at 1e-1; the expert router's own
#     gradient is off by 1.8e-3 of its largest entry at 1e-5 and by 2.4x at 1e-1 (there the balance loss
#     dominates that gradient). AdamW's first steps normalise each component, so after 3 steps (lr 3e-3) the
#     parameters differ by up to 1e-4 (N=2) / 2e-3 (N=4) at 1e-5 and 1.6e-2 at 1e-1, against ~3e-6 with
#     balance_coef 0 or in the exact mode. Larger microbatches (real runs) sample f more closely.
#   * `train.grad_accum_exact_balance=true`: a forward-only pass over the N microbatches first
#     (same noise; only f is kept, so the output layer is dead code for XLA) gives the batch's f, then the
#     N forward+backward passes use it: the one-batch update up to f32 rounding, for about one more
#     forward pass per step (~+1/3 of the step's compute without remat, ~+1/4 with remat=full).


def split_microbatches(batch, n: int):
    """`[B, ...] -> [n, B/n, ...]`, microbatch j = rows j, j+n, j+2n, ... (each device keeps its rows)."""
    b = batch.shape[0]
    micro = batch.reshape(b // n, n, *batch.shape[1:]).swapaxes(0, 1)
    return shd.constrain(micro, None, "act_batch", *(None,) * (batch.ndim - 1))


def microbatch_row_ids(j, n: int, rows: int):
    """Global row indices `[rows]` of microbatch j of `split_microbatches(batch, n)`."""
    return jnp.arange(rows, dtype=jnp.int32) * n + j


def _microbatch_stats(ce, aux, max_depth: int) -> dict[str, jax.Array]:
    """Per-microbatch means (summed over microbatches, then divided) and P_i for the balance loss."""
    stats = {"loss": ce, **summarize_aux(aux, max_depth)}
    if "router_prob" in aux:
        stats["router_prob"] = aux["router_prob"]  # [layers, E]
    return stats


def _finish_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The balance loss of the whole batch, `E * sum_i f_i P_i` per layer (mean over layers), from the
    batch means of f (`expert_load`) and P (`router_prob`); drops P (not logged)."""
    stats = dict(stats)
    if "router_prob" in stats:
        load, prob = stats["expert_load"], stats.pop("router_prob")
        stats["balance_loss"] = (load.shape[-1] * jnp.sum(load * prob, axis=-1)).mean()
    return stats


def _scan_microbatches(fn, batch, n: int, init=None):
    """Runs `fn(microbatch, row_ids) -> (carry_increment, stats)` over n microbatches; returns the summed
    increments (`init` + sum) and the microbatch-mean of `stats`. n = 1 calls `fn` once, without a scan."""
    if n == 1:
        inc, stats = fn(batch, None)
        return inc if init is None else jax.tree.map(jnp.add, init, inc), stats
    rows = batch.shape[0] // n

    def body(acc, xs):
        micro, j = xs
        inc, stats = fn(micro, microbatch_row_ids(j, n, rows))
        return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, inc), stats

    acc, stats = jax.lax.scan(body, init, (split_microbatches(batch, n), jnp.arange(n, dtype=jnp.int32)))
    return acc, jax.tree.map(lambda x: x.mean(0), stats)


def accumulate_gradients(graphdef, params, batch, cfg: Config, *, tau, rng, param_shardings=None):
    """(mean gradient, statistics) of the global batch in `cfg.train.grad_accum` microbatches.

    The gradients are summed in f32 (a carry sharded like the parameters), divided by N at the end.
    Statistics: `loss` (cross-entropy) and `summarize_aux`'s keys, the balance loss exact (see above)."""
    n = cfg.train.grad_accum
    grad_fn = jax.value_and_grad(forward_loss, argnums=1, has_aux=True)

    def one(micro, row_ids):
        (_, (ce, aux)), grads = grad_fn(graphdef, params, micro, cfg, train=True, tau=tau, rng=rng, row_ids=row_ids)
        return grads, _microbatch_stats(ce, aux, cfg.model.max_depth)

    if n == 1:
        grads, stats = one(batch, None)
        return grads, _finish_stats(stats)
    if cfg.train.grad_accum_exact_balance and cfg.model.ffn in EXPERT_KINDS:
        def load_of(micro, row_ids):  # forward only: the batch's expert load f of every layer first
            _, (_, aux) = forward_loss(graphdef, params, micro, cfg, train=True, tau=tau, rng=rng, row_ids=row_ids)
            return (), {"expert_load": aux["expert_load"]}

        batch_load = _scan_microbatches(load_of, batch, n, init=())[1]["expert_load"]

        def one(micro, row_ids):  # noqa: F811
            (_, (ce, aux)), grads = grad_fn(graphdef, params, micro, cfg, train=True, tau=tau, rng=rng,
                                            row_ids=row_ids, expert_load=batch_load)
            return grads, _microbatch_stats(ce, aux, cfg.model.max_depth)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if param_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    total, stats = _scan_microbatches(one, batch, n, init=zeros)
    grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), total, params)
    return grads, _finish_stats(stats)


def logged_total_loss(ce, stats, train: TrainConfig):
    """The objective as logged: cross-entropy + balance_coef * balance loss + z_loss_coef * z-loss."""
    total = ce
    if "balance_loss" in stats:
        total = total + train.balance_coef * stats["balance_loss"] + train.z_loss_coef * stats["z_loss"]
    return total


def load_balance(load_le) -> dict[str, np.ndarray]:
    """Per-layer max/mean and coefficient of variation of the expert load `[layers, E]` (host side,
    from the load aggregated over a logging window or an evaluation, so train and eval agree)."""
    load = np.asarray(load_le, np.float64)
    mean = load.mean(-1)
    return {"max_over_mean": load.max(-1) / mean, "cv": load.std(-1) / mean}


def _with_load_balance(row: dict[str, Any]) -> dict[str, Any]:
    if "expert_load" in row:
        stats = load_balance(row["expert_load"])
        row["expert_load_max_over_mean"] = float(stats["max_over_mean"].mean())
        row["expert_load_cv"] = float(stats["cv"].mean())
    return row


# --------------------------------------------------------------------------- memoised step builders

_STEPS: collections.OrderedDict = collections.OrderedDict()  # key -> jitted step, least recently used first
_STEPS_KEPT = 8  # a process rarely alternates between more programs (eval.py --all-steps, a sweep, the tests)


def _memoised(key, build):
    """One jitted program per (builder, model, train, mesh, shardings): a second `train()` or `evaluate_run()`
    with the same model and training sections in one process re-uses the traced and compiled step."""
    if key in _STEPS:
        _STEPS.move_to_end(key)
        return _STEPS[key]
    step = _STEPS[key] = build()
    while len(_STEPS) > _STEPS_KEPT:
        _STEPS.popitem(last=False)
    return step


def _tree_key(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def make_train_step(graphdef, tx, cfg: Config, mesh, param_shardings, opt_shardings):
    """The jitted step `(params, opt_state, batch [B, T+1], step) -> (params, opt_state, metrics)`: one
    optimizer update from the whole global batch, run as `train.grad_accum` microbatches.

    The step reads only `cfg.model` and `cfg.train` (and `tx`, which `optimizer.make_optimizer` memoises on
    `cfg.train`), so the program is memoised on those, the mesh and the shardings."""
    key = ("train", graphdef, tx, cfg.model, cfg.train, mesh, _tree_key(param_shardings), _tree_key(opt_shardings))
    return _memoised(key, lambda: _build_train_step(graphdef, tx, cfg, mesh, param_shardings, opt_shardings))


def _build_train_step(graphdef, tx, cfg: Config, mesh, param_shardings, opt_shardings):
    rep = shd.replicated(mesh)
    base_key = jax.random.key(cfg.train.seed + 1)

    def step_fn(params, opt_state, batch, step):
        tau = tau_at(step, cfg.train)
        rng = jax.random.fold_in(base_key, step)
        grads, stats = accumulate_gradients(graphdef, params, batch, cfg, tau=tau, rng=rng,
                                            param_shardings=param_shardings)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ce = stats.pop("loss")
        metrics = {"loss": ce, "total_loss": logged_total_loss(ce, stats, cfg.train),
                   "grad_norm": optax.tree.norm(grads), "tau": tau, "lr": lr_schedule(cfg.train)(step), **stats}
        return params, opt_state, metrics

    return shd.on_mesh(jax.jit(step_fn,
                               in_shardings=(param_shardings, opt_shardings, shd.batch_sharding(mesh), rep),
                               out_shardings=(param_shardings, opt_shardings, rep),
                               donate_argnums=(0, 1)), mesh)


def make_eval_step(graphdef, cfg: Config, mesh, param_shardings):
    """Inference-mode forward: summed CE, token count and the depth/expert statistics of one batch
    (in `train.grad_accum` microbatches, so evaluation fits wherever training does). Memoised as
    `make_train_step` is."""
    key = ("eval", graphdef, cfg.model, cfg.train, mesh, _tree_key(param_shardings))
    return _memoised(key, lambda: _build_eval_step(graphdef, cfg, mesh, param_shardings))


def _build_eval_step(graphdef, cfg: Config, mesh, param_shardings):

    def eval_fn(params, batch):
        def one(micro, _row_ids):
            _, (ce, aux) = forward_loss(graphdef, params, micro, cfg, train=False)
            stats = _microbatch_stats(ce, aux, cfg.model.max_depth)
            if "executed_loops" in aux:  # FFN loops per token the inference program ran, per layer (model.depth_exec)
                stats["executed_depth"] = aux["executed_loops"]  # [layers]
            return (), stats

        n = math.gcd(cfg.train.grad_accum, batch.shape[0])  # an eval batch resized by eval_lib may not split
        _, stats = _scan_microbatches(one, batch, n, init=())
        stats = _finish_stats(stats)
        n_tokens = batch[:, 1:].size
        return {"ce_sum": stats.pop("loss") * n_tokens, "tokens": jnp.asarray(n_tokens, jnp.float32), **stats}

    return shd.on_mesh(jax.jit(eval_fn, in_shardings=(param_shardings, shd.batch_sharding(mesh)),
                               out_shardings=shd.replicated(mesh)), mesh)


def global_batch(local_batch: np.ndarray, mesh) -> jax.Array:
    """Assembles the global batch from each process's rows."""
    return jax.make_array_from_process_local_data(shd.batch_sharding(mesh), local_batch)


def evaluate(eval_step, params, batches, mesh) -> dict[str, Any]:
    """Averages eval-step outputs over batches: loss, perplexity and the routing statistics."""
    totals: dict[str, Any] = {}
    n = 0
    for local in batches:
        out = jax.device_get(eval_step(params, global_batch(local, mesh)))
        n += 1
        for k, v in out.items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    if n == 0:
        raise ValueError("no evaluation batches: the held-out split is empty")
    loss = float(totals.pop("ce_sum") / totals.pop("tokens"))
    result = {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0)))}
    for k, v in totals.items():
        v = v / n
        result[k] = v.tolist() if np.ndim(v) else float(v)
    return _with_load_balance(result)


# --------------------------------------------------------------------------- logging helpers


def window_summary(window: list[dict]) -> dict[str, Any]:
    """Mean over the logging window; per-layer arrays are kept as lists."""
    row = {}
    for key in window[0]:
        values = np.mean([np.asarray(m[key], np.float64) for m in window], axis=0)
        row[key] = values.tolist() if np.ndim(values) else float(values)
    row["loss_last"] = float(window[-1]["loss"])
    return _with_load_balance(row)
