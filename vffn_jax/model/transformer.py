"""OLMo-style decoder in Flax NNX: attention, block, scanned layer stack (docs/method.md).

Pre-norm blocks, RMSNorm, RoPE, no biases, untied embeddings, causal attention. The FFN kind is
chosen by `ModelConfig.ffn`; its math lives in `ffn.py`. Layers are created with `nnx.vmap` (one
stacked set of weights with a leading `layers` axis) and run with `lax.scan`, so compile time
does not grow with depth.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
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


def rope(x_btnh, theta: float):
    """Rotary embedding, rotate-half (GPT-NeoX/OLMo) layout."""
    seq_len, head_dim = x_btnh.shape[1], x_btnh.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    x32 = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_btnh.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.cfg = cfg
        self.w_q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
        self.w_k = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
        self.w_v = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
        self.w_o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg)

    def __call__(self, x_btd, segment_ids=None):
        """Causal self-attention; with `segment_ids [B, T]` a token attends only within its own document."""
        dtype = jnp.dtype(self.cfg.dtype)
        x = x_btd.astype(dtype)
        q = rope(jnp.einsum("btd,dnh->btnh", x, self.w_q[...].astype(dtype)), self.cfg.rope_theta)
        k = rope(jnp.einsum("btd,dnh->btnh", x, self.w_k[...].astype(dtype)), self.cfg.rope_theta)
        v = jnp.einsum("btd,dnh->btnh", x, self.w_v[...].astype(dtype))
        q, k, v = (constrain(a, "act_batch", "act_seq", "act_heads", None) for a in (q, k, v))
        out = attention_lib.attend(q, k, v, segment_ids, kind=self.cfg.attention)
        return jnp.einsum("btnh,nhd->btd", out, self.w_o[...].astype(dtype))


class FFN(nnx.Module):
    """Stores the FFN's parameters under the names `ffn.py` expects and calls its pure function."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        shapes = ffn_lib.param_shapes(cfg.ffn, cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.max_depth)
        for name, (shape, names) in shapes.items():
            setattr(self, name, param(rngs, shape, names, cfg, ones=name == "norm_scale"))
        self.param_names = tuple(shapes)

    def params(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.param_names}

    def __call__(self, x_btd, *, train: bool = False, tau=1.0, rng=None, row_ids=None):
        c = self.cfg
        return ffn_lib.apply_ffn(
            c.ffn, self.params(), x_btd, n_experts=c.n_experts, top_k=c.top_k, max_depth=c.max_depth,
            n_loops=c.n_loops, train=train, tau=tau, rng=rng, row_ids=row_ids, dtype=jnp.dtype(c.dtype),
            eps=c.norm_eps, remat_loops=c.remat_loops)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = param(rngs, (cfg.d_model,), ("embed",), cfg, ones=True)
        self.attn = Attention(cfg, rngs)
        self.ffn = FFN(cfg, rngs)

    def __call__(self, h_btd, *, train: bool = False, tau=1.0, rng=None, row_ids=None, segment_ids=None):
        h_btd = constrain(h_btd, "act_batch", "act_seq", "act_embed")
        normed = ffn_lib.rms_norm(h_btd, self.attn_norm[...], self.cfg.norm_eps)
        x_btd = h_btd + self.attn(normed, segment_ids).astype(h_btd.dtype)
        return self.ffn(x_btd, train=train, tau=tau, rng=rng, row_ids=row_ids)


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
        self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

    def __call__(self, tokens_bt, *, train: bool = False, tau=1.0, rng=None, row_ids=None):
        """Returns f32 logits `[B, T, V]` and the per-layer FFN aux, stacked on a leading layer axis.

        `row_ids [B]`: the rows' indices in the global batch (default `0..B-1`). The depth router's
        Gumbel noise of a token depends on (rng, layer, row id, position) only, so a microbatch of
        gradient accumulation passes its rows' global indices and gets the whole batch's noise."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        # gathered whole, like any FSDP weight: a lookup into a vocab-sharded table makes XLA rematerialise it
        table = constrain(self.embed[...], None, "act_embed")
        h = constrain(jnp.take(table, tokens_bt, axis=0).astype(dtype), "act_batch", "act_seq", "act_embed")
        # model.doc_mask: document ids from EOS tokens; RoPE positions stay absolute (scores depend on offsets only)
        segment_ids = attention_lib.segment_ids(tokens_bt, cfg.eos_id) if cfg.doc_mask else None
        h, aux = self._run_layers(h, train=train, tau=tau, rng=rng, row_ids=row_ids, segment_ids=segment_ids)
        h = ffn_lib.rms_norm(h, self.final_norm[...], cfg.norm_eps)
        logits = jnp.einsum("btd,dv->btv", h, self.lm_head[...].astype(dtype), preferred_element_type=jnp.float32)
        return constrain(logits, "act_batch", "act_seq", "act_vocab"), aux

    def _run_layers(self, h, *, train, tau, rng, row_ids=None, segment_ids=None):
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.layers)
        keys = jax.random.split(rng, cfg.n_layers) if rng is not None else jnp.zeros((cfg.n_layers,), jnp.uint32)

        def layer_fn(h, xs):
            layer_state, key = xs
            layer = nnx.merge(graphdef, layer_state)
            return layer(h, train=train, tau=tau, rng=key if rng is not None else None, row_ids=row_ids,
                         segment_ids=segment_ids)

        if cfg.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=REMAT_POLICIES[cfg.remat])
        if cfg.scan_layers:
            return jax.lax.scan(layer_fn, h, (stacked, keys))
        auxes = []
        for i in range(cfg.n_layers):
            h, aux = layer_fn(h, jax.tree.map(lambda a: a[i], (stacked, keys)))
            auxes.append(aux)
        return h, jax.tree.map(lambda *a: jnp.stack(a), *auxes)
