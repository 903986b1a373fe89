"""Autoregressive decoding with a KV cache: pure functions over a restored params pytree.

Everything here is a function of `(ModelConfig, params)` where `params` is the nested dict of arrays
of a restored run (`eval_lib.restore_params(...).params`, an `nnx.State`, goes through `pure_params`).
The model is the model's own code: prefill and the decode step scan `model.transformer.layer` over the
stacked `[layers, ...]` parameters, exactly like the full forward (`Transformer._run_layers`), with
`embed` and `head` around it; only the attention kernel differs in a decode step. What is here is
decode-specific: the cache, the attention of one query over it, the generation loop and its driver.

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
from vffn_jax.model import transformer
from vffn_jax.infer import sampling
from vffn_jax.config import DEPTH_KINDS, ConfigError, ModelConfig
from vffn_jax.parallel.sharding import constrain, logical_to_spec

CACHE_AXES = ("layers", "act_batch", "act_seq", "act_kv_heads", None)
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
             "depth": jnp.zeros((b, n, n_layers), jnp.int32), "loops": jnp.zeros((n, n_layers), jnp.float32)}
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
    token i (run on the token before it); `loops[i]` the loops per row each layer executed in that step
    (float: about the rows' mean depth with `model.depth_exec=compact`, the deepest active row's with masked)."""

    prompt_ids: list[int]
    ids: list[int]
    logprobs: list[float]
    depth: np.ndarray  # [n, layers] int
    loops: np.ndarray  # [n, layers] float
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
