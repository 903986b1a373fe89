"""OLMo-style decoder: pure layer functions and the Flax NNX modules holding their parameters (docs/method.md).

Pre-norm blocks, RMSNorm, RoPE, no biases, untied embeddings, causal attention. The FFN kind is
chosen by `ModelConfig.ffn`; its math lives in `ffn.py`. The forward is pure functions over the
parameters' nested dicts (`embed`, `attention`, `layer`, `head`), shared with the KV-cache decoder
(`infer/decode.py`); the NNX modules only create and hold the parameters. Layers are created with
`nnx.vmap` (one stacked set of weights with a leading `layers` axis) and run with `lax.scan`, so
compile time does not grow with depth.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vffn_jax.model import attention as attention_lib
from vffn_jax.model import ffn as ffn_lib
from vffn_jax.config import ModelConfig
from vffn_jax.parallel.sharding import constrain

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param(rngs: nnx.Rngs, shape, names, cfg: ModelConfig, *, ones: bool = False) -> nnx.Param:
    """Truncated-normal(0, init_std, ±3 std) or ones, annotated with logical axis names."""
    dtype = jnp.dtype(cfg.param_dtype)
    if ones:
        value = jnp.ones(shape, dtype)
    else:
        value = cfg.init_std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """RoPE's inverse frequencies `[head_dim / 2]` (float32, computed as transformers' Llama computes them).

    `model.rope_scaling=llama3` (Llama 3.1/3.2): wavelengths longer than `original_max_len / low_freq_factor`
    are slowed down by `factor`, those shorter than `original_max_len / high_freq_factor` kept, and the band
    between interpolated smoothly."""
    h = cfg.head_dim
    inv_freq = (1.0 / np.float32(cfg.rope_theta) ** (np.arange(0, h, 2).astype(np.float32) / np.float32(h)))
    inv_freq = inv_freq.astype(np.float32)
    if cfg.rope_scaling == "llama3":
        factor, low, high = (np.float32(v) for v in (cfg.rope_factor, cfg.rope_low_freq_factor,
                                                     cfg.rope_high_freq_factor))
        old = np.float32(cfg.rope_original_max_len)
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope(x_btnh, positions, inv_freq):
    """Rotary embedding, rotate-half (GPT-NeoX/OLMo/Llama) layout, at `positions`: `[T]` (every row alike, the
    full forward's `arange`) or `[B, T]` (a decode step: each row at its own position); `inv_freq` from
    `rope_frequencies`."""
    angles = jnp.atleast_2d(positions).astype(jnp.float32)[..., None] * inv_freq  # [B or 1, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B or 1, T, 1, H]: broadcast over heads
    x32 = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_btnh.dtype)


# --------------------------------------------------------------------------- the forward, as pure functions
#
# Parameters are the nested dicts of `nnx.to_pure_dict` (the checkpoint's layout): one layer's `p` is
# `{"attn_norm", "attn": {"w_q", "w_k", "w_v", "w_o"}, "ffn": {...}}`. The full forward (training and
# eval), the prefill and the decode step of `infer/decode.py` all run these functions; they differ only
# in the attention kernel `attend` and the positions they pass.


def embed(cfg: ModelConfig, table_vd, tokens_bt):
    """Embedding lookup `[B, T] -> [B, T, d]` in the compute dtype."""
    # gathered whole, like any FSDP weight: a lookup into a vocab-sharded table makes XLA rematerialise it
    table = constrain(table_vd, None, "act_embed")
    return constrain(jnp.take(table, tokens_bt, axis=0).astype(jnp.dtype(cfg.dtype)), "act_batch", "act_seq",
                     "act_embed")


def causal_attend(cfg: ModelConfig, segment_ids=None):
    """The full-sequence kernel for `attention`: causal, within each document when `segment_ids [B, T]`."""
    return functools.partial(attention_lib.attend, seg=segment_ids, kind=cfg.attention)


def attention(cfg: ModelConfig, p, x_btd, positions, attend):
    """Self-attention of the normed stream: `(out [B, T, d], (k, v))`.

    `attend(q, k, v) -> [B, T, N, H]` is the kernel (`causal_attend`, or one query over a KV cache);
    `k`, `v` `[B, T, K, H]` (RoPE applied to k; K = `kv_heads`, fewer than the N query heads with grouped-query
    attention) are what a cache stores."""
    dtype = jnp.dtype(cfg.dtype)
    x = x_btd.astype(dtype)
    inv_freq = rope_frequencies(cfg)
    q = rope(jnp.einsum("btd,dnh->btnh", x, p["w_q"].astype(dtype)), positions, inv_freq)
    k = rope(jnp.einsum("btd,dkh->btkh", x, p["w_k"].astype(dtype)), positions, inv_freq)
    v = jnp.einsum("btd,dkh->btkh", x, p["w_v"].astype(dtype))
    q = constrain(q, "act_batch", "act_seq", "act_heads", None)
    k, v = (constrain(a, "act_batch", "act_seq", "act_kv_heads", None) for a in (k, v))
    return jnp.einsum("btnh,nhd->btd", attend(q, k, v), p["w_o"].astype(dtype)), (k, v)


def ffn(cfg: ModelConfig, p, x_btd, *, train: bool = False, tau=1.0, rng=None, row_ids=None, active=None):
    """The configured FFN (`ffn.apply_ffn`): `(y, aux)`. `active [B, T]` (inference only): see `ffn.depth_ffn`."""
    return ffn_lib.apply_ffn(
        cfg.ffn, p, x_btd, n_experts=cfg.n_experts, top_k=cfg.top_k, max_depth=cfg.max_depth,
        n_loops=cfg.n_loops, train=train, tau=tau, rng=rng, row_ids=row_ids, active=active,
        dtype=jnp.dtype(cfg.dtype), eps=cfg.norm_eps, remat_loops=cfg.remat_loops,
        depth_exec="masked" if cfg.depth_exec == "masked" else "compact", depth_block=cfg.depth_block)


def layer(cfg: ModelConfig, p, h_btd, positions, attend, *, train: bool = False, tau=1.0, rng=None, row_ids=None,
          active=None):
    """One pre-norm block, `x = h + attn(norm(h))` then the FFN (its residual included): `(y, aux, (k, v))`."""
    h_btd = constrain(h_btd, "act_batch", "act_seq", "act_embed")
    normed = ffn_lib.rms_norm(h_btd, p["attn_norm"], cfg.norm_eps)
    out, kv = attention(cfg, p["attn"], normed, positions, attend)
    y, aux = ffn(cfg, p["ffn"], h_btd + out.astype(h_btd.dtype), train=train, tau=tau, rng=rng, row_ids=row_ids,
                 active=active)
    return y, aux, kv


def lm_head(cfg: ModelConfig, params):
    """The output projection `[d, V]` of a params dict: `lm_head`, or the embedding transposed (`model.tie_embeddings`)."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def head(cfg: ModelConfig, final_norm_d, lm_head_dv, h_btd):
    """Final RMSNorm and the LM head (`lm_head(cfg, params)`): f32 logits `[B, T, V]`."""
    h = ffn_lib.rms_norm(h_btd, final_norm_d, cfg.norm_eps)
    logits = jnp.einsum("btd,dv->btv", h, lm_head_dv.astype(jnp.dtype(cfg.dtype)), preferred_element_type=jnp.float32)
    return constrain(logits, "act_batch", "act_seq", "act_vocab")


# --------------------------------------------------------------------------- modules: the parameters


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.w_q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
        self.w_k = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.w_v = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.w_o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg)


class FFN(nnx.Module):
    """The FFN's parameters under the names `ffn.py` expects (`ffn.param_shapes`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        shapes = ffn_lib.param_shapes(cfg.ffn, cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.max_depth)
        for name, (shape, names) in shapes.items():
            setattr(self, name, param(rngs, shape, names, cfg, ones=name == "norm_scale"))


class Block(nnx.Module):
    """One layer's parameters (`layer` runs it)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = param(rngs, (cfg.d_model,), ("embed",), cfg, ones=True)
        self.attn = Attention(cfg, rngs)
        self.ffn = FFN(cfg, rngs)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab_in", "embed"), cfg)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return Block(cfg, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = param(rngs, (cfg.d_model,), ("embed",), cfg, ones=True)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

    def __call__(self, tokens_bt, *, train: bool = False, tau=1.0, rng=None, row_ids=None):
        """Returns f32 logits `[B, T, V]` and the per-layer FFN aux, stacked on a leading layer axis.

        `row_ids [B]`: the rows' indices in the global batch (default `0..B-1`). The depth router's
        Gumbel noise of a token depends on (rng, layer, row id, position) only, so a microbatch of
        gradient accumulation passes its rows' global indices and gets the whole batch's noise."""
        cfg = self.cfg
        h = embed(cfg, self.embed[...], tokens_bt)
        # model.doc_mask: document ids from EOS tokens; RoPE positions stay absolute (scores depend on offsets only)
        segment_ids = attention_lib.segment_ids(tokens_bt, cfg.eos_id) if cfg.doc_mask else None
        h, aux = self._run_layers(h, train=train, tau=tau, rng=rng, row_ids=row_ids, segment_ids=segment_ids)
        out = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        return head(cfg, self.final_norm[...], out, h), aux

    def _run_layers(self, h, *, train, tau, rng, row_ids=None, segment_ids=None):
        cfg = self.cfg
        stacked = nnx.to_pure_dict(nnx.state(self.layers))  # [layers, ...] arrays, the checkpoint's layout
        keys = jax.random.split(rng, cfg.n_layers) if rng is not None else jnp.zeros((cfg.n_layers,), jnp.uint32)
        attend = causal_attend(cfg, segment_ids)

        def layer_fn(h, xs):
            p, key = xs
            positions = jnp.arange(h.shape[1], dtype=jnp.float32)  # in the body: XLA hoists one sin/cos table
            y, aux, _ = layer(cfg, p, h, positions, attend, train=train, tau=tau, rng=key if rng is not None else None,
                              row_ids=row_ids)
            return y, aux

        if cfg.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            return jax.lax.scan(layer_fn, h, (stacked, keys))
        auxes = []
        for i in range(cfg.n_layers):
            h, aux = layer_fn(h, jax.tree.map(lambda a: a[i], (stacked, keys)))
            auxes.append(aux)
        return h, jax.tree.map(lambda *a: jnp.stack(a), *auxes)
