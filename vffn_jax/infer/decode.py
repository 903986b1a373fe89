"""Autoregressive decoding with a KV cache: pure functions over a restored params pytree.

Everything here is a function of `(ModelConfig, params)` where `params` is the nested dict of arrays
of a restored run (`eval_lib.restore_params(...).params`, an `nnx.State`, goes through `pure_params`).
The math is the model's own: `model.rope`'s formula at explicit positions, `ffn.rms_norm`, the
attention kernels of `attention.py` and the FFN functions of `ffn.py` — no weights are copied or
re-laid out, the stacked `[layers, ...]` parameters are scanned over like `Transformer._run_layers`.

Cache layout (one pytree, per decode batch):
  * `k`, `v`: `[layers, B, S, N, H]` in the compute dtype (`model.dtype`), S = the cache length
    (prompt bucket + new tokens, at most the context `train.seq_len`). Logical axes
    `(layers, act_batch, act_seq, act_heads, -)`: rows over the data-parallel mesh axes (data, fsdp),
    heads over `tensor`, exactly like the training activations, so a decode step needs no more
    communication than a forward pass of one token.
  * `seg`: `[B, S]` int32 document index of each cached token (`model.doc_mask`; zeros otherwise).

Prefill runs the prompt batch (right-padded to one bucket length T, rows of different lengths) through
the layer scan with the configured attention kernel, causal within the prompt — the same computation
as the full forward — and writes each layer's K/V for positions `[0, T)` into the cache. Padded
positions are marked inactive: they are masked out of every later attention (a key at position j is
visible to a query at position p only if j < p) and are overwritten as the row generates.

A decode step feeds one token per row at its own position `pos[b]` (rows advance independently):
the scan over layers reads that layer's cache slice (read-only), attends the new query to the cached
keys `j < pos[b]` plus its own key (one softmax over both), and returns the layer's new K/V; after the
scan they are scattered into the cache at `[:, b, pos[b]]` (in place inside the decode loop).

Depth at inference (docs/method.md): each token runs its own `argmax(depth_logits) + 1` loops; one
`lax.while_loop` per layer runs to the deepest *active* token of the step (finished or padding rows are
forced to depth 1, so they never extend the loop) and masks the others, exactly `ffn.depth_infer`.
So the *executed* loops of a layer in a step are `max(depth)` over the active rows, while each token's
own depth is what its output depends on; both are returned. Versatile skips its width path (one
down-projection) when no active token in the step has alpha > 0. Dense/kloop/width_only/moe call
`ffn.apply_ffn` unchanged (depth = 1, or K for kloop).

The generation loop (`make_decoder`) is two jitted programs: `prefill` (prompt -> cache, first token)
and `decode` (a `lax.while_loop` over new tokens that stops when every row has finished: EOS, the
token budget, or a full cache). Results stay on device until the end.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vffn_jax.model import attention as attention_lib
from vffn_jax.model import ffn as ffn_lib
from vffn_jax.infer import sampling
from vffn_jax.config import DEPTH_KINDS, ConfigError, ModelConfig
from vffn_jax.parallel.sharding import constrain, logical_to_spec

CACHE_AXES = ("layers", "act_batch", "act_seq", "act_heads", None)
MIN_BUCKET = 16


def pure_params(params) -> dict:
    """A nested dict of arrays from an `nnx.State` (or such a dict already)."""
    if isinstance(params, dict) and not hasattr(params, "to_pure_dict"):
        return params
    from flax import nnx

    return nnx.to_pure_dict(params)


def loops_per_layer(m: ModelConfig) -> int | None:
    """Fixed FFN loops of a variant without a depth router (None for depth-routed variants)."""
    if m.ffn in DEPTH_KINDS:
        return None
    return m.n_loops if m.ffn == "kloop" else 1


# --------------------------------------------------------------------------- pieces of one layer


def rope_at(x_btnh, positions_bt, theta: float):
    """`model.rope` at explicit per-token positions `[B, T]` (the same formula, so the same values)."""
    head_dim = x_btnh.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_btnh.dtype)


def _qkv(m: ModelConfig, lp, h, positions):
    dtype = jnp.dtype(m.dtype)
    x = ffn_lib.rms_norm(h, lp["attn_norm"], m.norm_eps).astype(dtype)
    a = lp["attn"]
    q = rope_at(jnp.einsum("btd,dnh->btnh", x, a["w_q"].astype(dtype)), positions, m.rope_theta)
    k = rope_at(jnp.einsum("btd,dnh->btnh", x, a["w_k"].astype(dtype)), positions, m.rope_theta)
    v = jnp.einsum("btd,dnh->btnh", x, a["w_v"].astype(dtype))
    return tuple(constrain(t, "act_batch", "act_seq", "act_heads", None) for t in (q, k, v))


def _attn_out(m: ModelConfig, lp, h, att):
    w_o = lp["attn"]["w_o"].astype(jnp.dtype(m.dtype))
    return h + jnp.einsum("btnh,nhd->btd", att, w_o).astype(h.dtype)


def cached_attention(q, k_new, v_new, k_cache, v_cache, visible):
    """One query per row (`[B, 1, N, H]`) over the cached keys where `visible [B, S]`, plus its own key."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s_cache = jnp.einsum("btnh,bsnh->bnts", q, k_cache).astype(jnp.float32) * scale
    s_cache = jnp.where(visible[:, None, None, :], s_cache, jnp.finfo(jnp.float32).min)
    s_self = jnp.einsum("btnh,btnh->bnt", q, k_new).astype(jnp.float32)[..., None] * scale
    probs = jax.nn.softmax(jnp.concatenate([s_cache, s_self], axis=-1), axis=-1)
    p_cache, p_self = probs[..., :-1].astype(q.dtype), probs[..., -1].astype(q.dtype)  # [B,N,T,S], [B,N,T]
    out = jnp.einsum("bnts,bsnh->btnh", p_cache, v_cache) + jnp.swapaxes(p_self, 1, 2)[..., None] * v_new
    return out


def ffn_infer(m: ModelConfig, p, x, active):
    """One layer's inference FFN on `x [B, T, d]`: `(y, depth [B, T] int32, executed loops () int32)`.

    Depth-routed variants mirror `ffn.versatile_ffn` / `ffn.depth_ffn` with `train=False`, built from the
    same pieces, except that inactive tokens (`active [B, T]` false: padding, finished rows) get depth 1
    so the while_loop stops at the deepest *active* token."""
    dtype = jnp.dtype(m.dtype)
    fixed = loops_per_layer(m)
    if fixed is not None:
        y, _ = ffn_lib.apply_ffn(m.ffn, p, x, n_experts=m.n_experts, top_k=m.top_k, max_depth=m.max_depth,
                                 n_loops=m.n_loops, train=False, dtype=dtype, eps=m.norm_eps)
        return y, jnp.full(x.shape[:-1], fixed, jnp.int32), jnp.asarray(fixed, jnp.int32)
    L = m.max_depth
    pc = {k: v.astype(dtype) for k, v in p.items()}
    x32 = x.astype(jnp.float32)
    depth_logits = x32 @ p["depth_router"].astype(jnp.float32)
    _, depth = ffn_lib.depth_choice(depth_logits, train=False, tau=1.0, rng=None)
    depth = jnp.where(active, depth, 1)
    hidden = ffn_lib.swiglu_hidden(pc, x, m.norm_eps)
    y1 = x + hidden @ pc["w_down"]
    x_depth = ffn_lib.depth_infer(pc, y1, depth, eps=m.norm_eps)
    loops = jnp.max(depth)
    if m.ffn == "depth_only":
        return x_depth, depth, loops
    expert_logits = x32 @ p["expert_router"].astype(jnp.float32)
    gates, _ = ffn_lib.expert_gates(expert_logits, m.top_k)
    if m.ffn == "versatile_avg":
        alpha = jnp.full(depth.shape, 0.5, jnp.float32)
    else:
        alpha = (L - depth.astype(jnp.float32)) / L
    a = alpha[..., None].astype(x.dtype)

    def fuse():
        return (1 - a) * x_depth + a * ffn_lib.width_from_hidden(pc, x, hidden, gates)

    if m.ffn == "versatile":  # alpha == 0 for every active token: the width path would add exactly 0
        return jax.lax.cond(jnp.any((alpha > 0) & active), fuse, lambda: x_depth), depth, loops
    return fuse(), depth, loops


def _embed(m: ModelConfig, params, tokens_bt):
    table = constrain(params["embed"], None, "act_embed")
    h = jnp.take(table, tokens_bt, axis=0).astype(jnp.dtype(m.dtype))
    return constrain(h, "act_batch", "act_seq", "act_embed")


def _head(m: ModelConfig, params, h_btd):
    h = ffn_lib.rms_norm(h_btd, params["final_norm"], m.norm_eps)
    logits = jnp.einsum("btd,dv->btv", h, params["lm_head"].astype(jnp.dtype(m.dtype)),
                        preferred_element_type=jnp.float32)
    return constrain(logits, "act_batch", "act_seq", "act_vocab")


# --------------------------------------------------------------------------- prefill and one decode step


def prefill(m: ModelConfig, params, tokens_bt, lengths_b, cache_len: int, *, all_logits: bool = False):
    """Runs right-padded prompts `[B, T]` (row b's real length `lengths[b]`, 0 for a padding row).

    Returns `(logits, cache, depth [B, T, layers], loops [layers], next_seg [B])`: logits `[B, V]` at each
    row's last prompt token (`[B, T, V]` at every position with `all_logits`), the cache of length
    `cache_len` holding positions `[0, T)`, each prompt token's own depth per layer, the executed loops
    per layer (max depth over the real prompt tokens) and the document index of the next token."""
    b, t = tokens_bt.shape
    if cache_len < t:
        raise ValueError(f"cache_len {cache_len} < prompt length {t}")
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    active = positions < lengths_b[:, None]
    seg = attention_lib.segment_ids(tokens_bt, m.eos_id) if m.doc_mask else None

    def layer(h, lp):
        h = constrain(h, "act_batch", "act_seq", "act_embed")
        q, k, v = _qkv(m, lp, h, positions)
        x = _attn_out(m, lp, h, attention_lib.attend(q, k, v, seg, kind=m.attention))
        y, depth, loops = ffn_infer(m, lp["ffn"], x, active)
        return y, (k, v, depth, loops)

    h, (k, v, depth, loops) = jax.lax.scan(layer, _embed(m, params, tokens_bt), params["layers"])
    pad = ((0, 0), (0, 0), (0, cache_len - t), (0, 0), (0, 0))
    cache = {"k": constrain(jnp.pad(k, pad), *CACHE_AXES), "v": constrain(jnp.pad(v, pad), *CACHE_AXES),
             "seg": jnp.pad(seg if seg is not None else jnp.zeros((b, t), jnp.int32), ((0, 0), (0, cache_len - t)))}
    last = jnp.clip(lengths_b - 1, 0, t - 1)
    if all_logits:
        logits = _head(m, params, h)
    else:
        logits = _head(m, params, jnp.take_along_axis(h, last[:, None, None], axis=1))[:, 0]
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

    def layer(h, xs):
        lp, k_cache, v_cache = xs
        h = constrain(h, "act_batch", "act_seq", "act_embed")
        q, k, v = _qkv(m, lp, h, positions)
        x = _attn_out(m, lp, h, cached_attention(q, k, v, k_cache, v_cache, visible))
        y, depth, loops = ffn_infer(m, lp["ffn"], x, active)
        return y, (k[:, 0], v[:, 0], depth[:, 0], loops)

    h, (k, v, depth, loops) = jax.lax.scan(layer, _embed(m, params, tokens_b[:, None]),
                                           (params["layers"], cache["k"], cache["v"]))
    rows = jnp.arange(b)
    cache = {"k": constrain(cache["k"].at[:, rows, pos_b].set(k, mode="drop"), *CACHE_AXES),
             "v": constrain(cache["v"].at[:, rows, pos_b].set(v, mode="drop"), *CACHE_AXES),
             "seg": cache["seg"].at[rows, pos_b].set(seg_b, mode="drop")}
    return _head(m, params, h)[:, 0], cache, jnp.moveaxis(depth, 0, -1), loops


# --------------------------------------------------------------------------- the generation loop


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    max_new_tokens: int
    cache_len: int  # S: positions the cache holds (a row stops when its next token would not fit)
    sampling: sampling.SamplingConfig = sampling.SamplingConfig()
    eos_id: int | None = None  # stop a row at this token (None: never)
    valid_vocab: int | None = None  # the tokenizer's vocabulary: logits beyond it are never sampled


def _record(state, logits, depth, loops, active, o: DecodeOptions, key):
    """Samples slot t for the `active` rows and writes token, log-prob, depth and loops."""
    t = state["t"]
    logits = sampling.mask_vocab(logits, o.valid_vocab)
    tok = sampling.sample(logits, o.sampling, key, state["row_ids"], t)
    logprob = sampling.token_logprob(logits, tok)
    out = dict(state)
    out["tokens"] = state["tokens"].at[:, t].set(jnp.where(active, tok, -1))
    out["logprobs"] = state["logprobs"].at[:, t].set(jnp.where(active, logprob, 0.0))
    out["depth"] = state["depth"].at[:, t].set(jnp.where(active[:, None], depth, 0))
    out["loops"] = state["loops"].at[t].set(loops)
    return out, tok


def _continues(tok, t, pos, o: DecodeOptions):
    """Whether a row that just sampled `tok` into slot t (to be fed at `pos`) goes on."""
    go = (t + 1 < o.max_new_tokens) & (pos < o.cache_len)
    if o.eos_id is not None:
        go = go & (tok != o.eos_id)
    return go


def prefill_state(m: ModelConfig, o: DecodeOptions, params, tokens_bt, lengths_b, row_ids_b, key):
    """Prefill and the first sampled token: the decode loop's initial state."""
    b, n_layers, n = tokens_bt.shape[0], m.n_layers, o.max_new_tokens
    logits, cache, depth, loops, seg = prefill(m, params, tokens_bt, lengths_b, o.cache_len)
    active = lengths_b > 0
    depth_last = jnp.take_along_axis(depth, jnp.clip(lengths_b - 1, 0)[:, None, None], axis=1)[:, 0]
    state = {"cache": cache, "row_ids": row_ids_b, "t": jnp.asarray(0, jnp.int32),
             "tokens": jnp.full((b, n), -1, jnp.int32), "logprobs": jnp.zeros((b, n), jnp.float32),
             "depth": jnp.zeros((b, n, n_layers), jnp.int32), "loops": jnp.zeros((n, n_layers), jnp.int32)}
    state, tok = _record(state, logits, depth_last, loops, active, o, key)
    state.update(tok=tok, pos=lengths_b, seg=seg, active=active & _continues(tok, 0, lengths_b, o),
                 t=jnp.asarray(1, jnp.int32), prefill_loops=loops)
    return state


def decode_loop(m: ModelConfig, o: DecodeOptions, params, state, key):
    """Generates slots `t..max_new_tokens-1` until every row has finished (a `lax.while_loop`)."""

    def cond(st):
        return (st["t"] < o.max_new_tokens) & jnp.any(st["active"])

    def body(st):
        active = st["active"]
        logits, cache, depth, loops = decode_step(m, params, st["cache"], st["tok"], st["pos"], st["seg"], active)
        st = dict(st, cache=cache)
        st, tok = _record(st, logits, depth, loops, active, o, key)
        pos = st["pos"] + 1
        seg = st["seg"] + (st["tok"] == m.eos_id).astype(jnp.int32) if m.doc_mask else st["seg"]
        st.update(tok=jnp.where(active, tok, st["tok"]), pos=jnp.where(active, pos, st["pos"]),
                  seg=jnp.where(active, seg, st["seg"]), active=active & _continues(tok, st["t"], pos, o),
                  t=st["t"] + 1)
        return st

    return jax.lax.while_loop(cond, body, state)


@dataclasses.dataclass
class Decoder:
    """The two compiled programs for one (model, options, mesh): `prefill(params, tokens, lengths,
    row_ids, key) -> state` and `decode(params, state, key) -> state`."""

    m: ModelConfig
    options: DecodeOptions
    mesh: Any
    prefill: Any
    decode: Any


@functools.lru_cache(maxsize=32)
@functools.lru_cache(maxsize=32)  # one pair of jitted programs per shape: later batches of a run reuse them
def make_decoder(m: ModelConfig, options: DecodeOptions, mesh=None) -> Decoder:
    pre = jax.jit(functools.partial(prefill_state, m, options))
    dec = jax.jit(functools.partial(decode_loop, m, options), donate_argnums=(1,))
    if mesh is not None:
        from vffn_jax.parallel.sharding import on_mesh

        pre, dec = on_mesh(pre, mesh), on_mesh(dec, mesh)
    return Decoder(m, options, mesh, pre, dec)


# --------------------------------------------------------------------------- host-side driver


def bucket(n: int, cap: int) -> int:
    """A compile-friendly length >= n: the next power of two (at least MIN_BUCKET), at most `cap`."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


def _to_host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _put(x: np.ndarray, mesh, names):
    if mesh is None:
        return jnp.asarray(x)
    sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(names))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def batch_multiple(mesh) -> int:
    """Rows of a decode batch must be a multiple of the data-parallel size (act_batch's mesh axes)."""
    if mesh is None:
        return 1
    axes = logical_to_spec(("act_batch",))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(dict(mesh.shape)[a] for a in axes)


@dataclasses.dataclass
class Generation:
    """One prompt's continuation. `depth[i]` is the loops per layer of the forward pass that produced
    token i (run on the token before it); `loops[i]` the loops each layer executed in that step
    (max depth over the batch's active rows)."""

    prompt_ids: list[int]
    ids: list[int]
    logprobs: list[float]
    depth: np.ndarray  # [n, layers] int
    loops: np.ndarray  # [n, layers] int
    finish_reason: str  # "eos" | "length" | "context"


@dataclasses.dataclass
class GenerateStats:
    prefill_s: float
    decode_s: float
    decode_steps: int  # decode-loop iterations (after the first token)
    decode_tokens: int  # tokens generated by those iterations (all rows)
    prefill_loops: np.ndarray  # [layers] executed in the prefill
    step_loops: np.ndarray  # [decode_steps, layers] executed per decode step


def generate(m: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, context: int,
             sampling_cfg: sampling.SamplingConfig = sampling.SamplingConfig(), seed: int = 0,
             eos_id: int | None = None, valid_vocab: int | None = None, mesh=None,
             ) -> tuple[list[Generation], GenerateStats]:
    """Continues every prompt (lists of token ids) in one batch; see `Generation`.

    `context`: the longest sequence the model attends over (the run's `train.seq_len`); a prompt may hold
    up to `context` tokens and a row stops when its next token would not fit. ConfigError for bad input."""
    sampling.validate(sampling_cfg)
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    if not prompts:
        raise ConfigError("no prompts to continue")
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ConfigError("a prompt has no tokens (give it text, or keep the EOS prefix)")
    if max(lengths) > context:
        i = int(np.argmax(lengths))
        raise ConfigError(f"prompt {i} has {lengths[i]} tokens, more than the model's context of {context} "
                          "(train.seq_len); shorten it")
    params = pure_params(params)
    t_pad = bucket(max(lengths), context)
    cache_len = bucket(t_pad + max_new_tokens - 1, context) if max_new_tokens > 1 else t_pad
    cache_len = max(cache_len, t_pad)
    rows = -(-len(prompts) // batch_multiple(mesh)) * batch_multiple(mesh)
    tokens = np.zeros((rows, t_pad), np.int32)
    lens = np.zeros((rows,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        lens[i] = len(p)
    options = DecodeOptions(max_new_tokens, cache_len, sampling_cfg, eos_id, valid_vocab)
    dec = make_decoder(m, options, mesh)
    key = jax.random.key(seed)
    row_ids = _put(np.arange(rows, dtype=np.int32), mesh, ("act_batch",))
    t0 = time.perf_counter()
    state = dec.prefill(params, _put(tokens, mesh, ("act_batch", None)), _put(lens, mesh, ("act_batch",)),
                        row_ids, key)
    jax.block_until_ready(state["tokens"])
    t1 = time.perf_counter()
    state = dec.decode(params, state, key)
    jax.block_until_ready(state["tokens"])
    t2 = time.perf_counter()
    out = {k: _to_host(state[k]) for k in ("tokens", "logprobs", "depth", "loops", "t", "prefill_loops", "pos")}
    steps = int(out["t"]) - 1
    gens = []
    for i, p in enumerate(prompts):
        n = int(np.sum(out["tokens"][i] >= 0))
        ids = out["tokens"][i, :n].tolist()
        loops_i = np.concatenate([out["prefill_loops"][None], out["loops"][1:n]], axis=0) if n else out["loops"][:0]
        if eos_id is not None and ids and ids[-1] == eos_id:
            reason = "eos"
        elif n >= max_new_tokens:
            reason = "length"
        else:
            reason = "context"
        gens.append(Generation(list(p), ids, out["logprobs"][i, :n].tolist(), out["depth"][i, :n], loops_i, reason))
    decode_tokens = int(np.sum(out["tokens"][:, 1:] >= 0))
    stats = GenerateStats(t1 - t0, t2 - t1, steps, decode_tokens, out["prefill_loops"], out["loops"][1:1 + steps])
    return gens, stats
