"""Autoregressive decoding with a KV cache: pure functions over a restored params pytree.

The generation loop over the KV cache of `vffn_jax.model.kv_cache` (cache layout, cached attention, prefill, the
decode step): prompts in, tokens out, each token at its own depth.

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

from vffn_jax.model import kv_cache
from vffn_jax.infer import sampling
from vffn_jax.config import ConfigError, ModelConfig
from vffn_jax.parallel.sharding import logical_to_spec

MIN_BUCKET = 16


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
    logits, cache, depth, loops, seg = kv_cache.prefill(m, params, tokens_bt, lengths_b, o.cache_len)
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
        logits, cache, depth, loops = kv_cache.decode_step(m, params, st["cache"], st["tok"], st["pos"], st["seg"], active)
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
    params = kv_cache.pure_params(params)
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
