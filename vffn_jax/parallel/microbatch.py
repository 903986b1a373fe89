"""Microbatches of a global batch: a strided split that moves no data between devices, and a scan over the
microbatches that sums a carry and averages statistics (gradient accumulation, and evaluation in the same
microbatches so it fits wherever training does; the layout is explained in train/step.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vffn_jax.parallel import sharding as shd


def split_microbatches(batch, n: int):
    """`[B, ...] -> [n, B/n, ...]`, microbatch j = rows j, j+n, j+2n, ... (each device keeps its rows)."""
    b = batch.shape[0]
    micro = batch.reshape(b // n, n, *batch.shape[1:]).swapaxes(0, 1)
    return shd.constrain(micro, None, "act_batch", *(None,) * (batch.ndim - 1))


def microbatch_row_ids(j, n: int, rows: int):
    """Global row indices `[rows]` of microbatch j of `split_microbatches(batch, n)`."""
    return jnp.arange(rows, dtype=jnp.int32) * n + j


def scan_microbatches(fn, batch, n: int, init=None):
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
