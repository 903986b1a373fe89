"""The one scoring function for multiple-choice and log-likelihood requests, on the mesh: the in-loop tasks
(`run.tasks`), `eval.py --tasks` and the lm-evaluation-harness backend all score through `make_score_fn` and
`score_sequences`.

Requests are packed into fixed-shape int32 batches `[B, T + 1]` (tokens, right-padded) plus `[B, 2]`
continuation spans, `B` a multiple of the data-parallel size (by default as many rows as fit in one training
batch's tokens, at most `SHARD_TOKENS` per data-parallel shard). Batches are assembled with
`sharding.global_batch` from each process's rows, so multi-process runs work (every process takes its share);
one jitted function returns each row's summed continuation log-probability (log-softmax in float32 over the
whole vocabulary, as transformers computes it) and whether every continuation token is the argmax, compiled
once per (B, T).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

ROW_ALIGN = 64  # request widths are rounded up to a multiple of this (fewer distinct compiled shapes)
SHARD_TOKENS = 4096  # default batch: at most this many tokens per data-parallel shard (bounds the logits' memory)


def make_score_fn(graphdef, mesh, param_shardings):
    """Jitted (params, tokens [B, T+1], spans [B, 2]) -> (sums [B] of the spans' target log-probs, greedy [B]:
    every target in the span is the argmax of its logits). Row r's scored targets are positions
    spans[r, 0]..spans[r, 1]-1 of tokens[:, 1:]."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vffn_jax.parallel import sharding as shd

    def score(params, tokens, spans):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, _ = nnx.merge(graphdef, params)(inputs, train=False)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        pos = jnp.arange(targets.shape[1])[None, :]
        mask = (pos >= spans[:, :1]) & (pos < spans[:, 1:])
        greedy = jnp.all(jnp.where(mask, jnp.argmax(logits, axis=-1) == targets, True), axis=-1)
        return jnp.sum(jnp.where(mask, target_logp, 0.0), axis=-1), greedy

    batch, out = shd.batch_sharding(mesh), shd.replicated(mesh)
    return shd.on_mesh(jax.jit(score, in_shardings=(param_shardings, batch, batch), out_shardings=(out, out)), mesh)


def pack(sequences: Sequence[Sequence[int]], cont_lens: Sequence[int], rows: Sequence[int], batch_rows: int,
         width: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, width + 1] int32 right-padded with 0, spans [B, 2] int32) of `sequences[rows]`, whose last
    `cont_lens[i]` tokens are scored. Rows past `len(rows)` are padding with an empty span."""
    tokens = np.zeros((batch_rows, width + 1), np.int32)
    spans = np.zeros((batch_rows, 2), np.int32)
    for j, i in enumerate(rows):
        t = sequences[i]
        tokens[j, :len(t)] = t
        spans[j] = (len(t) - 1 - cont_lens[i], len(t) - 1)
    return tokens, spans


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


def score_sequences(score_fn, params, mesh, sequences: Sequence[Sequence[int]], cont_lens: Sequence[int],
                    rows: Sequence[int], batch_rows: int, width: int,
                    out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores `sequences[rows]` in batches of `batch_rows` x `width + 1`: (sums, greedy) indexed like `sequences`
    (`out` to fill arrays already allocated; rows not in `rows` stay as they are)."""
    import jax

    from vffn_jax.parallel import sharding as shd

    n = len(sequences)
    sums, greedy = out if out is not None else (np.zeros(n, np.float64), np.zeros(n, bool))
    local = local_rows(mesh, (batch_rows, width + 1))
    rows = list(rows)
    for lo in range(0, len(rows), batch_rows):
        chunk = rows[lo:lo + batch_rows]
        tokens, spans = pack(sequences, cont_lens, chunk, batch_rows, width)
        got_sums, got_greedy = jax.device_get(score_fn(params, shd.global_batch(tokens[local], mesh),
                                                       shd.global_batch(spans[local], mesh)))
        sums[chunk] = np.asarray(got_sums, np.float64)[:len(chunk)]
        greedy[chunk] = np.asarray(got_greedy)[:len(chunk)]
    return sums, greedy


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def batch_rows_for(n_requests: int, width: int, dp: int, token_budget: int, batch_rows: int | None = None) -> int:
    """Rows per batch: `batch_rows` (rounded up to a multiple of `dp`) or as many as fit `token_budget`
    tokens, never more than the requests need."""
    if batch_rows is None:
        batch_rows = max(token_budget // max(width, 1), 1)
    batch_rows = round_up(max(int(batch_rows), 1), dp)
    return max(dp, min(batch_rows, round_up(max(n_requests, 1), dp)))


def data_parallel_size(mesh) -> int:
    shape = dict(zip(mesh.axis_names, (int(x) for x in mesh.devices.shape)))
    return shape["data"] * shape["fsdp"]
