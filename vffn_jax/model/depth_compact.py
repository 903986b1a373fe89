"""Depth-compacted inference: each FFN loop runs only on the tokens that need it (`model.depth_exec=compact`).

The masked inference loop (`ffn.depth_infer`) runs loop l on every token of the batch while any token needs
it, and keeps the result only where `l <= depth`: a batch costs `max(depth)` loops per token. Here a layer
instead

  1. sorts its tokens by depth, deepest first (one stable argsort), so the tokens that need loop l are a
     *prefix* of the sorted buffer for every l (`n_l` = how many tokens have depth >= l);
  2. runs loop l on that prefix only, in blocks of `block` rows (`lax.fori_loop` over `ceil(n_l / block)`
     blocks of a static shape, rows past `n_l` in the last block computed and discarded);
  3. scatters the buffer back to the tokens' places.

Every token goes through exactly the same `ffn_loop` calls as in the masked loop, on the same rows, so the
outputs are the same (up to the matmul's row blocking, ~1e-7 in f32) and so is everything downstream;
the cost is `1 + sum_l ceil(n_l / block) * block / n` loops per token instead of `max(depth)`.

Sharded batches: each device sorts and runs its own tokens (`shard_map` over the mesh axes of the batch;
the tensor axis stays automatic, so tensor-parallel FFN weights still work), with no host round trip.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vffn_jax.parallel.sharding import logical_to_spec

P = jax.sharding.PartitionSpec


def block_rows(n_tokens: int, depth_block: int) -> int:
    """Rows per block: at most `depth_block`, and at most an eighth of the tokens (rounded up), so that a
    small batch (a decode step of 8 or 64 rows) still skips the rows that stop early."""
    return max(1, min(depth_block, -(-n_tokens // 8)))


def _compact_local(p, y1, depth, *, eps: float, depth_block: int, max_depth: int, loop_fn):
    """One device's tokens: `(y_depth like y1, rows run)`; `depth` has y1's shape without the last axis."""
    shape, d = y1.shape, y1.shape[-1]
    z = y1.reshape(-1, d)
    dep = depth.reshape(-1)
    n = z.shape[0]
    block = block_rows(n, depth_block)
    n_pad = -(-n // block) * block
    order = jnp.argsort(-dep, stable=True)  # deepest first: the tokens needing loop l are a prefix
    buf = jnp.pad(z[order], ((0, n_pad - n), (0, 0)))
    need = jnp.sum(dep[None, :] >= jnp.arange(2, max_depth + 1, dtype=dep.dtype)[:, None], axis=1)  # n_l, l = 2..L
    n_blocks = (need + block - 1) // block

    def run_loop(i, buf):  # loop l = i + 2 over the first need[i] rows
        def run_block(b, buf):
            start = b * block
            rows = jax.lax.dynamic_slice_in_dim(buf, start, block)
            keep = (start + jnp.arange(block)) < need[i]
            new = jnp.where(keep[:, None], loop_fn(p, rows, eps), rows)
            return jax.lax.dynamic_update_slice_in_dim(buf, new, start, 0)

        return jax.lax.fori_loop(0, n_blocks[i], run_block, buf)

    deepest = jnp.max(dep) - 1  # loops after the first that any token of this device needs
    buf = jax.lax.fori_loop(0, deepest.astype(jnp.int32), run_loop, buf)
    out = jnp.zeros_like(z).at[order].set(buf[:n])
    rows_run = n + jnp.sum(n_blocks * block)
    return out.reshape(shape), rows_run.astype(jnp.float32)


def compact_depth(p, y1, depth, *, eps: float, depth_block: int, max_depth: int, loop_fn):
    """`(y_depth, executed loops per token)`: each token's own `depth` loops (loop 1 = `y1` already done).

    Under a mesh whose batch axes (`act_batch`) span several devices the compaction runs per device
    (`shard_map`); the executed loops are the rows every device ran over all tokens."""
    kw = dict(eps=eps, depth_block=depth_block, max_depth=max_depth, loop_fn=loop_fn)
    mesh = jax.sharding.get_abstract_mesh()
    axes = None if mesh.empty else logical_to_spec(("act_batch",))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if dict(mesh.shape).get(a, 1) > 1) if axes else ()
    n_tokens = depth.size
    if not axes or y1.shape[0] % _size(mesh, axes):
        y, rows = _compact_local(p, y1, depth, **kw)
        return y, rows / n_tokens

    def local(p, y1, depth):
        y, rows = _compact_local(p, y1, depth, **kw)
        return y, jax.lax.psum(rows, axes)

    batch = P(axes)
    y, rows = jax.shard_map(local, mesh=mesh, in_specs=(jax.tree.map(lambda _: P(), p), batch, batch),
                            out_specs=(batch, P()), axis_names=frozenset(axes), check_vma=False)(p, y1, depth)
    return y, rows / n_tokens


def _size(mesh, axes) -> int:
    shape = dict(mesh.shape)
    out = 1
    for a in axes:
        out *= shape[a]
    return out
