"""The KV-cache half of decoding, beside the model: the cache layout, the attention of one query over it, prefill
and one decode step, as pure functions of `(ModelConfig, params)` (params: the nested dict of arrays, `pure_params`).

Prefill and the decode step scan `model.transformer.layer` over the stacked `[layers, ...]` parameters, exactly like
the full forward, with `embed` and `head` around it; only the attention kernel differs in a decode step.

Cache layout (one pytree, per decode batch):
  * `k`, `v`: `[layers, B, S, K, H]` in the compute dtype (`model.dtype`), S = the cache length
    (prompt bucket + new tokens, at most the context `train.seq_len`), K the key/value heads (`model.n_kv_heads`:
    fewer than the query heads with grouped-query attention, so the cache shrinks by N/K). Logical axes
    `(layers, act_batch, act_seq, act_kv_heads, -)`: rows over the data-parallel mesh axes (data, fsdp),
    heads over `tensor`, exactly like the training activations, so a decode step needs no more
    communication than a forward pass of one token.
  * `seg`: `[B, S]` int32 document index of each cached token (`model.doc_mask`; zeros otherwise).

Prefill runs the prompt batch (right-padded to one bucket length T, rows of different lengths) through
the layer scan with the configured attention kernel, causal within the prompt — the full forward's
computation — and writes each layer's K/V for positions `[0, T)` into the cache. Padded positions are
marked inactive: they are masked out of every later attention (a key at position j is visible to a
query at position p only if j < p) and are overwritten as the row generates.

A decode step feeds one token per row at its own position `pos[b]` (rows advance independently):
the scan over layers reads that layer's cache slice (read-only), attends the new query to the cached
keys `j < pos[b]` plus its own key (one softmax over both, `cached_attention`), and returns the layer's
new K/V; after the scan they are scattered into the cache at `[:, b, pos[b]]` (in place inside the
decode loop).

Depth at inference (docs/method.md): the FFN is the inference FFN of the eval forward
(`ffn.apply_ffn(train=False)`) given the step's `active` tokens: each token runs its own
`argmax(depth_logits) + 1` loops (finished or padding rows are forced to depth 1), and versatile skips its
width path when no active token has alpha > 0. With `model.depth_exec=compact` (the default) a layer runs
loop l only on the rows whose depth reaches it (`model/depth_compact.py`), so a step's *executed* loops per
row are about the rows' mean depth; with `masked` every row runs as deep as the deepest active row. Each
token's own depth (what its output depends on) and the executed loops per row (float) are both returned.
Dense/kloop/width/moe run a fixed number of loops (1, or K for kloop: `loops_per_layer`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from vffn_jax.model import attention as attention_lib
from vffn_jax.model import transformer
from vffn_jax.model.config import ModelConfig, loops_per_layer
from vffn_jax.parallel.sharding import constrain

CACHE_AXES = ("layers", "act_batch", "act_seq", "act_kv_heads", None)


def pure_params(params) -> dict:
    """A nested dict of arrays from an `nnx.State` (or such a dict already)."""
    if isinstance(params, dict) and not hasattr(params, "to_pure_dict"):
        return params
    from flax import nnx

    return nnx.to_pure_dict(params)


def _token_depth(m: ModelConfig, aux, shape):
    """(each token's FFN loops in one layer `[B, T]`: the depth router's choice (1 for inactive tokens) or the
    variant's fixed count; the loops per token the layer executed, float: `model.depth_exec` decides)."""
    if "depth" in aux:
        return aux["depth"], aux["executed_loops"]
    return jnp.full(shape, loops_per_layer(m), jnp.int32), jnp.asarray(loops_per_layer(m), jnp.float32)


def cached_attention(q, k_new, v_new, k_cache, v_cache, visible):
    """One query per row (`[B, 1, N, H]`) over the cached keys where `visible [B, S]`, plus its own key.

    The cache holds the K key/value heads only (`[B, S, K, H]`); with grouped-query attention the N query
    heads are attended as K groups of N/K, so the cache is never repeated up to N heads."""
    b, t, n, h = q.shape
    kv = k_cache.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)  # query head n sits in group n // (N/K), like the full forward's kernel
    scale = 1.0 / math.sqrt(h)
    s_cache = jnp.einsum("btkgh,bskh->bkgts", q, k_cache).astype(jnp.float32) * scale
    s_cache = jnp.where(visible[:, None, None, None, :], s_cache, jnp.finfo(jnp.float32).min)
    s_self = jnp.einsum("btkgh,btkh->bkgt", q, k_new).astype(jnp.float32)[..., None] * scale
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_self], axis=-1), axis=-1)
    p_cache, p_self = probs[..., :-1].astype(q.dtype), probs[..., -1].astype(q.dtype)  # [B,K,G,T,S], [B,K,G,T]
    out = (jnp.einsum("bkgts,bskh->btkgh", p_cache, v_cache)
           + jnp.moveaxis(p_self, -1, 1)[..., None] * v_new[:, :, :, None, :])
    return out.reshape(b, t, n, h)


# --------------------------------------------------------------------------- prefill and one decode step


def prefill(m: ModelConfig, params, tokens_bt, lengths_b, cache_len: int, *, all_logits: bool = False):
    """Runs right-padded prompts `[B, T]` (row b's real length `lengths[b]`, 0 for a padding row).

    Returns `(logits, cache, depth [B, T, layers], loops [layers], next_seg [B])`: logits `[B, V]` at each
    row's last prompt token (`[B, T, V]` at every position with `all_logits`), the cache of length
    `cache_len` holding positions `[0, T)`, each prompt token's own depth per layer, the loops per token each
    layer executed (float, `model.depth_exec`) and the document index of the next token."""
    b, t = tokens_bt.shape
    if cache_len < t:
        raise ValueError(f"cache_len {cache_len} < prompt length {t}")
    positions = jnp.arange(t)
    active = positions[None, :] < lengths_b[:, None]
    seg = attention_lib.segment_ids(tokens_bt, m.eos_id) if m.doc_mask else None
    attend = transformer.causal_attend(m, seg)

    def body(h, p):
        y, aux, (k, v) = transformer.layer(m, p, h, positions, attend, active=active)
        depth, executed = _token_depth(m, aux, (b, t))
        return y, (k, v, depth, executed)

    h, (k, v, depth, loops) = jax.lax.scan(body, transformer.embed(m, params["embed"], tokens_bt), params["layers"])
    pad = ((0, 0), (0, 0), (0, cache_len - t), (0, 0), (0, 0))
    cache = {"k": constrain(jnp.pad(k, pad), *CACHE_AXES), "v": constrain(jnp.pad(v, pad), *CACHE_AXES),
             "seg": jnp.pad(seg if seg is not None else jnp.zeros((b, t), jnp.int32), ((0, 0), (0, cache_len - t)))}
    last = jnp.clip(lengths_b - 1, 0, t - 1)
    if all_logits:
        logits = transformer.head(m, params["final_norm"], transformer.lm_head(m, params), h)
    else:
        logits = transformer.head(m, params["final_norm"], transformer.lm_head(m, params),
                                  jnp.take_along_axis(h, last[:, None, None], axis=1))[:, 0]
    if m.doc_mask:
        last_tok = jnp.take_along_axis(tokens_bt, last[:, None], axis=1)[:, 0]
        next_seg = jnp.take_along_axis(seg, last[:, None], axis=1)[:, 0] + (last_tok == m.eos_id)
    else:
        next_seg = jnp.zeros((b,), jnp.int32)
    return logits, cache, jnp.moveaxis(depth, 0, -1), loops, next_seg.astype(jnp.int32)


def decode_step(m: ModelConfig, params, cache, tokens_b, pos_b, seg_b, active_b):
    """Feeds one token per row at position `pos[b]` (segment `seg[b]`); returns
    `(logits [B, V], cache, depth [B, layers], loops [layers])`. Rows with `active` false still compute
    (static shapes) but have depth 1 and do not extend any loop."""
    b = tokens_b.shape[0]
    s = cache["k"].shape[2]
    positions = pos_b[:, None]
    visible = jnp.arange(s)[None, :] < pos_b[:, None]
    if m.doc_mask:
        visible = visible & (cache["seg"] == seg_b[:, None])
    active = active_b[:, None]

    def body(h, xs):
        p, k_cache, v_cache = xs
        attend = functools.partial(cached_attention, k_cache=k_cache, v_cache=v_cache, visible=visible)
        y, aux, (k, v) = transformer.layer(m, p, h, positions, attend, active=active)
        depth, executed = _token_depth(m, aux, (b, 1))
        return y, (k[:, 0], v[:, 0], depth[:, 0], executed)

    h, (k, v, depth, loops) = jax.lax.scan(body, transformer.embed(m, params["embed"], tokens_b[:, None]),
                                           (params["layers"], cache["k"], cache["v"]))
    rows = jnp.arange(b)
    cache = {"k": constrain(cache["k"].at[:, rows, pos_b].set(k, mode="drop"), *CACHE_AXES),
             "v": constrain(cache["v"].at[:, rows, pos_b].set(v, mode="drop"), *CACHE_AXES),
             "seg": cache["seg"].at[rows, pos_b].set(seg_b, mode="drop")}
    logits = transformer.head(m, params["final_norm"], transformer.lm_head(m, params), h)
    return logits[:, 0], cache, jnp.moveaxis(depth, 0, -1), loops
