"""AdamW with the cosine schedule and decay mask of docs/method.md, and the optimizer state's placement."""
from __future__ import annotations

import functools

import jax
import optax

from vffn_jax.config import TrainConfig
from vffn_jax.model.placement import Setup, init_params
from vffn_jax.parallel import sharding as shd


def opt_state_shardings(tx: optax.GradientTransformation, s: "Setup"):
    """(abstract optimizer state, its shardings): moments follow their parameters' logical axes."""
    abstract_opt = jax.eval_shape(tx.init, s.abstract_params)
    return abstract_opt, shd.state_shardings(abstract_opt, s.mesh)


def init_train_state(s: "Setup", tx: optax.GradientTransformation, opt_shardings):
    """Fresh (params, opt_state), each shard written in place on its device."""
    _, params, _ = init_params(s.cfg.model, s.mesh, s.cfg.train.seed)
    return params, jax.jit(tx.init, out_shardings=opt_shardings)(params)


def lr_schedule(train: TrainConfig) -> optax.Schedule:
    warmup = int(round(train.warmup_frac * train.steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.lr, warmup_steps=warmup,
        decay_steps=max(train.steps, warmup + 1), end_value=train.lr * train.final_lr_frac)


def _decay_mask(params):
    """Weight decay on matrices, not on norm scales (docs/method.md)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", k)) for k in path), params)


@functools.lru_cache(maxsize=16)  # the same object for the same section, so the train step can be memoised on it
def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(lr_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                    weight_decay=train.weight_decay, mask=_decay_mask),
    )
