"""The loss, the jitted train step and gradient accumulation (the eval step: vffn_jax/evals/step.py).

The step is a pure `jax.jit` function of (params, opt_state, batch, step) with explicit shardings; the
Gumbel temperature and the noise key are pure functions of the step, so resume is exact.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vffn_jax.config import EXPERT_KINDS, Config, TrainConfig, tau_at
from vffn_jax.model.stats import finish_stats, microbatch_stats
from vffn_jax.parallel import sharding as shd
from vffn_jax.parallel.microbatch import scan_microbatches
from vffn_jax.parallel.program_cache import memoised, tree_key
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


# --------------------------------------------------------------------------- gradient accumulation
#
# `train.grad_accum = N` runs the global batch `[B, T+1]` as N microbatches of B/N rows in a
# `lax.scan`, sums the gradients and takes one optimizer step. Microbatch j holds the rows
# j, j+N, j+2N, ... (a strided split: `[B] -> [B/N, N]`, transposed). The batch is sharded over
# (data, fsdp) in contiguous blocks of B/D rows; B % (N*D) == 0 makes each device's block a whole
# number of [B/N, N] tiles, so every microbatch takes B/(N*D) rows from each device's own block and the
# split moves no data (checked in tests/unit/train/test_step.py: no collective on the batch).
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
#     (tests/unit/train/test_step.py: 8 x 32 tokens, N=4, first step): the whole gradient's relative error is
#     2.6e-7 at balance_coef 1e-5 (f32 rounding alone: 2.3e-7) and 5.4e-4 at 1e-1; the expert router's own
#     gradient is off by 1.8e-3 of its largest entry at 1e-5 and by 2.4x at 1e-1 (there the balance loss
#     dominates that gradient). AdamW's first steps normalise each component, so after 3 steps (lr 3e-3) the
#     parameters differ by up to 1e-4 (N=2) / 2e-3 (N=4) at 1e-5 and 1.6e-2 at 1e-1, against ~3e-6 with
#     balance_coef 0 or in the exact mode. Larger microbatches (real runs) sample f more closely.
#   * `train.grad_accum_exact_balance=true`: a forward-only pass over the N microbatches first
#     (same noise; only f is kept, so the output layer is dead code for XLA) gives the batch's f, then the
#     N forward+backward passes use it: the one-batch update up to f32 rounding, for about one more
#     forward pass per step (~+1/3 of the step's compute without remat, ~+1/4 with remat=full).


def accumulate_gradients(graphdef, params, batch, cfg: Config, *, tau, rng, param_shardings=None):
    """(mean gradient, statistics) of the global batch in `cfg.train.grad_accum` microbatches.

    The gradients are summed in f32 (a carry sharded like the parameters), divided by N at the end.
    Statistics: `loss` (cross-entropy) and `summarize_aux`'s keys, the balance loss exact (see above)."""
    n = cfg.train.grad_accum
    grad_fn = jax.value_and_grad(forward_loss, argnums=1, has_aux=True)

    def one(micro, row_ids):
        (_, (ce, aux)), grads = grad_fn(graphdef, params, micro, cfg, train=True, tau=tau, rng=rng, row_ids=row_ids)
        return grads, microbatch_stats(ce, aux, cfg.model.max_depth)

    if n == 1:
        grads, stats = one(batch, None)
        return grads, finish_stats(stats)
    if cfg.train.grad_accum_exact_balance and cfg.model.ffn in EXPERT_KINDS:
        def load_of(micro, row_ids):  # forward only: the batch's expert load f of every layer first
            _, (_, aux) = forward_loss(graphdef, params, micro, cfg, train=True, tau=tau, rng=rng, row_ids=row_ids)
            return (), {"expert_load": aux["expert_load"]}

        batch_load = scan_microbatches(load_of, batch, n, init=())[1]["expert_load"]

        def one(micro, row_ids):  # noqa: F811
            (_, (ce, aux)), grads = grad_fn(graphdef, params, micro, cfg, train=True, tau=tau, rng=rng,
                                            row_ids=row_ids, expert_load=batch_load)
            return grads, microbatch_stats(ce, aux, cfg.model.max_depth)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if param_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    total, stats = scan_microbatches(one, batch, n, init=zeros)
    grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), total, params)
    return grads, finish_stats(stats)


def logged_total_loss(ce, stats, train: TrainConfig):
    """The objective as logged: cross-entropy + balance_coef * balance loss + z_loss_coef * z-loss."""
    total = ce
    if "balance_loss" in stats:
        total = total + train.balance_coef * stats["balance_loss"] + train.z_loss_coef * stats["z_loss"]
    return total


# --------------------------------------------------------------------------- memoised step builders

def make_train_step(graphdef, tx, cfg: Config, mesh, param_shardings, opt_shardings):
    """The jitted step `(params, opt_state, batch [B, T+1], step) -> (params, opt_state, metrics)`: one
    optimizer update from the whole global batch, run as `train.grad_accum` microbatches.

    The step reads only `cfg.model` and `cfg.train` (and `tx`, which `optimizer.make_optimizer` memoises on
    `cfg.train`), so the program is memoised on those, the mesh and the shardings."""
    key = ("train", graphdef, tx, cfg.model, cfg.train, mesh, tree_key(param_shardings), tree_key(opt_shardings))
    return memoised(key, lambda: _build_train_step(graphdef, tx, cfg, mesh, param_shardings, opt_shardings))


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


