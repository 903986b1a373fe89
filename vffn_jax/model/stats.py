"""The routing statistics of a forward pass, as logged by training and reported by evaluation: per-layer depth
histograms, mean depth and alpha, expert load and the balance loss of a whole batch, load balance on the host."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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


def microbatch_stats(ce, aux, max_depth: int) -> dict[str, jax.Array]:
    """Per-microbatch means (summed over microbatches, then divided) and P_i for the balance loss."""
    stats = {"loss": ce, **summarize_aux(aux, max_depth)}
    if "router_prob" in aux:
        stats["router_prob"] = aux["router_prob"]  # [layers, E]
    return stats


def finish_stats(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The balance loss of the whole batch, `E * sum_i f_i P_i` per layer (mean over layers), from the
    batch means of f (`expert_load`) and P (`router_prob`); drops P (not logged)."""
    stats = dict(stats)
    if "router_prob" in stats:
        load, prob = stats["expert_load"], stats.pop("router_prob")
        stats["balance_loss"] = (load.shape[-1] * jnp.sum(load * prob, axis=-1)).mean()
    return stats


def load_balance(load_le) -> dict[str, np.ndarray]:
    """Per-layer max/mean and coefficient of variation of the expert load `[layers, E]` (host side,
    from the load aggregated over a logging window or an evaluation, so train and eval agree)."""
    load = np.asarray(load_le, np.float64)
    mean = load.mean(-1)
    return {"max_over_mean": load.max(-1) / mean, "cv": load.std(-1) / mean}


def with_load_balance(row: dict[str, Any]) -> dict[str, Any]:
    if "expert_load" in row:
        stats = load_balance(row["expert_load"])
        row["expert_load_max_over_mean"] = float(stats["max_over_mean"].mean())
        row["expert_load_cv"] = float(stats["cv"].mean())
    return row
