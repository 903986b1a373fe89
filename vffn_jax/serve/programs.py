"""The server's two device programs over one persistent KV cache of `slots` rows (`model.kv_cache`'s layout):

* `prefill(T, echo)`: R right-padded prompts `[R, T]` (T a bucket of `infer.decode.bucket`, R the data-parallel
  size) through `kv_cache.prefill` — the same computation `generate.py`'s prefill runs — whose K/V are scattered
  into the cache rows `slot_r` (a row whose slot is `slots`, out of range, writes nothing: a padding row or a
  request that needs no slot); returns each row's first token, its log-probability, the top log-probabilities,
  the prompt tokens' depth and, with `echo`, every prompt token's log-probability (for scoring).
* `step`: K `kv_cache.decode_step`s over every slot — each the model's one forward pass of a token per row, with
  depth-compacted FFN loops (`model.depth_exec`) where free or finished slots are inactive rows that run one
  loop and extend none — each followed by per-row sampling (`serve.rows`). K > 1 (`steps_per_call`) pays the
  host round trip (dispatch, copies, the engine's bookkeeping) once per K tokens instead of once per token, as
  `generate.py`'s on-device `while_loop` pays it once per batch; the price is up to K - 1 wasted steps for a row
  that ends inside a call and up to K steps before a new request is admitted.

Shapes are fixed by (rows, cache length, T, echo), so a server compiles one step program per bucket of slots
(`SlotLayout`: the data-parallel size times powers of two, up to the slots) and at most 2 x log2(context)
prefill programs, whatever its traffic. Log-probabilities of generated tokens are the model's own
(temperature 1, unfiltered) over the tokenizer's vocabulary, as `generate.py --json` reports them; prompt
(echo) log-probabilities are a float32 log-softmax over the model's whole vocabulary, as the project's lm-eval
backend and transformers score.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vffn_jax.infer import sampling
from vffn_jax.model import kv_cache
from vffn_jax.model.config import ModelConfig
from vffn_jax.parallel.sharding import constrain
from vffn_jax.serve import rows

TOP_N = 5  # top log-probabilities computed per token (OpenAI's completions allow logprobs <= 5)


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    slots: int  # B: decode rows (a multiple of the data-parallel size)
    prefill_rows: int  # R: prompts per prefill call (the data-parallel size)
    cache_len: int  # S: positions per slot (the context, train.seq_len)
    valid_vocab: int  # the tokenizer's vocabulary: logits beyond it are never sampled
    eos_id: int  # a row that samples it stops (unless its request ignores EOS)
    steps_per_call: int = 8  # K: decode steps per device call (one host round trip per K tokens)
    data_parallel: int = 1  # devices the slot axis is split over

    @property
    def layout(self) -> "SlotLayout":
        return SlotLayout(self.slots, self.data_parallel)


def _first_token(spec: ProgramSpec, logits_rv, samp):
    masked = sampling.mask_vocab(logits_rv.astype(jnp.float32), spec.valid_vocab)
    tok = rows.sample_rows(masked, samp["temperature"], samp["top_k"], samp["top_p"], samp["seed"], samp["t"])
    logp = jax.nn.log_softmax(masked, axis=-1)
    top_ids, top_lps = rows.top_logprobs(logp, TOP_N)
    return {"tok": tok, "logprob": jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0],
            "top_ids": top_ids, "top_lps": top_lps}


def prefill_slots(m: ModelConfig, spec: ProgramSpec, echo: bool, params, cache, tokens_rt, lengths_r, slot_r, samp):
    """(cache with rows `slot_r` holding the prompts, outputs); see the module docstring."""
    t = tokens_rt.shape[1]
    logits, pc, depth_rtl, loops_l, next_seg_r = kv_cache.prefill(m, params, tokens_rt, lengths_r, t,
                                                                   all_logits=echo)
    last_r = jnp.clip(lengths_r - 1, 0, t - 1)
    out = {}
    if echo:
        logp_rtv = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nxt = jnp.concatenate([tokens_rt[:, 1:], tokens_rt[:, :1]], axis=1)  # token j+1 scored at position j
        lp = jnp.take_along_axis(logp_rtv, nxt[..., None], axis=-1)[..., 0]
        out["prompt_logprob"] = jnp.concatenate([jnp.zeros_like(lp[:, :1]), lp[:, :-1]], axis=1)  # [R, T]
        vals, ids = jax.lax.top_k(logp_rtv, TOP_N)
        out["prompt_top_ids"] = jnp.concatenate([jnp.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1).astype(jnp.int32)
        out["prompt_top_lps"] = jnp.concatenate([jnp.zeros_like(vals[:, :1]), vals[:, :-1]], axis=1)
        logits = jnp.take_along_axis(logits, last_r[:, None, None], axis=1)[:, 0]
    out.update(_first_token(spec, logits, samp))
    out["depth"] = jnp.take_along_axis(depth_rtl, last_r[:, None, None], axis=1)[:, 0]  # [R, layers]
    out["prompt_depth"] = depth_rtl
    out["loops"] = loops_l
    out["next_seg"] = next_seg_r
    new = {}
    for name in ("k", "v"):
        new[name] = constrain(cache[name].at[:, slot_r, :t].set(pc[name], mode="drop"), *kv_cache.CACHE_AXES)
    new["seg"] = cache["seg"].at[slot_r, :t].set(pc["seg"], mode="drop")
    return new, out


def decode_slots(m: ModelConfig, spec: ProgramSpec, params, cache, st):
    """K decode steps over every slot (`lax.scan`). `st` holds `[B]` arrays: tok (the token to feed), pos (where),
    seg, active, t (the index of the token being sampled), budget (max_tokens), stop_eos, and the sampling settings
    temperature, top_k, top_p, seed. A row goes inactive on device when it samples EOS (if stop_eos), reaches its
    budget or fills the cache, exactly when the host would end it, so the steps after that are wasted but never
    wrong. Returns `(cache, st after K steps, outputs stacked [K, ...])`; `outputs["active"][j]` says which rows
    sampled a real token in step j."""
    s_len, eos = spec.cache_len, spec.eos_id

    def one(carry, _):
        cache, s = carry
        logits, cache, depth_bl, loops_l = kv_cache.decode_step(m, params, cache, s["tok"], s["pos"], s["seg"],
                                                                s["active"])
        out = _first_token(spec, logits, s)
        out.update(depth=depth_bl, loops=loops_l, active=s["active"])
        act, tok = s["active"], out["tok"]
        pos = s["pos"] + 1  # where the new token would be fed
        seg = s["seg"] + (s["tok"] == eos).astype(jnp.int32) if m.doc_mask else s["seg"]
        go = act & (s["t"] + 1 < s["budget"]) & (pos < s_len) & ~(s["stop_eos"] & (tok == eos))
        new = dict(s, tok=jnp.where(act, tok, s["tok"]), pos=jnp.where(act, pos, s["pos"]),
                   seg=jnp.where(act, seg, s["seg"]), t=jnp.where(act, s["t"] + 1, s["t"]), active=go)
        return (cache, new), out

    (cache, st), outs = jax.lax.scan(one, (cache, st), None, length=spec.steps_per_call)
    return cache, st, outs


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Which slots a decode call computes. The cache's slot axis is split over the data-parallel devices in
    blocks of `per` slots (slot s lives on device s // per, at place s % per). A call computes the first q places
    of every device's block, q a power of two below `per` or `per` itself (`buckets`): a bucket of the slot axis
    that stays evenly sharded, with no data moved between devices. The engine gives new requests the lowest free
    place on any device, so few requests in flight keep q small."""

    slots: int
    data_parallel: int

    @property
    def per(self) -> int:
        return self.slots // self.data_parallel

    @property
    def buckets(self) -> tuple[int, ...]:
        out, q = [], 1
        while q < self.per:
            out.append(q)
            q *= 2
        return tuple(out) + (self.per,)

    def bucket_for(self, in_use) -> int:
        """The smallest q whose places hold every slot in `in_use`."""
        deepest = max(int(s) % self.per for s in in_use)
        return next(q for q in self.buckets if q > deepest)

    def members(self, q: int) -> np.ndarray:
        """The slots bucket q computes, in the order of its rows."""
        return (np.arange(self.data_parallel)[:, None] * self.per + np.arange(q)[None, :]).reshape(-1)

    def row_of(self, q: int, slot):
        """A slot's row in bucket q's arrays (the inverse of `members`)."""
        return (slot // self.per) * q + slot % self.per

    def fill_order(self, free) -> list[int]:
        """Free slots in the order new requests take them: the lowest place first, across devices."""
        return sorted(free, key=lambda s: (s % self.per, s // self.per))


def _bucket_view(x, axis: int, layout: SlotLayout, q: int):
    """x's slot axis as [devices, per] cut to [devices, q] and flattened back (a slice within each device)."""
    shape = x.shape
    split = x.reshape(shape[:axis] + (layout.data_parallel, layout.per) + shape[axis + 1:])
    part = jax.lax.slice_in_dim(split, 0, q, axis=axis + 1)
    return part.reshape(shape[:axis] + (layout.data_parallel * q,) + shape[axis + 1:])


def _bucket_write(x, part, axis: int, layout: SlotLayout, q: int):
    """x with bucket q's slots replaced by `part` (the inverse of `_bucket_view`)."""
    shape = x.shape
    split = x.reshape(shape[:axis] + (layout.data_parallel, layout.per) + shape[axis + 1:])
    part = part.reshape(shape[:axis] + (layout.data_parallel, q) + shape[axis + 1:])
    return jax.lax.dynamic_update_slice_in_dim(split, part, 0, axis=axis + 1).reshape(shape)


def decode_bucket(m: ModelConfig, spec: ProgramSpec, q: int, params, cache, st):
    """`decode_slots` over bucket q of the slots only (`st` holds that bucket's rows, in `SlotLayout.members`
    order): with few requests in flight, a step computes the slots in use, not all of them. The other slots'
    cache rows pass through untouched."""
    layout = spec.layout
    if q == layout.per:
        return decode_slots(m, spec, params, cache, st)
    part = {"k": _bucket_view(cache["k"], 1, layout, q), "v": _bucket_view(cache["v"], 1, layout, q),
            "seg": _bucket_view(cache["seg"], 0, layout, q)}
    part, st, outs = decode_slots(m, spec, params, part, st)
    cache = {name: _bucket_write(cache[name], part[name], 0 if name == "seg" else 1, layout, q) for name in cache}
    cache["k"] = constrain(cache["k"], *kv_cache.CACHE_AXES)
    cache["v"] = constrain(cache["v"], *kv_cache.CACHE_AXES)
    return cache, st, outs


def empty_cache(m: ModelConfig, spec: ProgramSpec, params):
    """The persistent cache: zeros shaped like `kv_cache.prefill`'s, with `slots` rows of `cache_len`."""
    toks = jax.ShapeDtypeStruct((spec.prefill_rows, spec.cache_len), jnp.int32)
    lens = jax.ShapeDtypeStruct((spec.prefill_rows,), jnp.int32)
    shapes = jax.eval_shape(lambda p, x, n: kv_cache.prefill(m, p, x, n, spec.cache_len)[1], params, toks, lens)

    def zeros(s, axes):
        x = jnp.zeros((s.shape[0], spec.slots) + s.shape[2:], s.dtype) if axes else jnp.zeros(
            (spec.slots,) + s.shape[1:], s.dtype)
        return constrain(x, *axes) if axes else x

    return {"k": zeros(shapes["k"], kv_cache.CACHE_AXES), "v": zeros(shapes["v"], kv_cache.CACHE_AXES),
            "seg": zeros(shapes["seg"], ())}


@dataclasses.dataclass
class Programs:
    """The jitted programs of one served model (compiled on first use, kept for the server's life)."""

    m: ModelConfig
    spec: ProgramSpec
    mesh: Any
    _prefill: dict = dataclasses.field(default_factory=dict)

    _step: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self._empty = self._wrap(jax.jit(functools.partial(empty_cache, self.m, self.spec)))

    def _wrap(self, fn):
        if self.mesh is None:
            return fn
        from vffn_jax.parallel.sharding import on_mesh

        return on_mesh(fn, self.mesh)

    def empty_cache(self, params):
        return self._empty(params)

    def prefill(self, t: int, echo: bool):
        key = (t, echo)
        if key not in self._prefill:
            self._prefill[key] = self._wrap(jax.jit(functools.partial(prefill_slots, self.m, self.spec, echo),
                                                    donate_argnums=(1,)))
        return self._prefill[key]

    def step(self, params, cache, st, q: int | None = None):
        """K decode steps over bucket q of the slots (default all; `st` holds its rows, see `SlotLayout`):
        (cache, their state after the steps, outputs [K, rows, ...])."""
        q = self.spec.layout.per if q is None else q
        if q not in self._step:
            self._step[q] = self._wrap(jax.jit(functools.partial(decode_bucket, self.m, self.spec, q),
                                               donate_argnums=(1,)))
        return self._step[q](params, cache, st)
