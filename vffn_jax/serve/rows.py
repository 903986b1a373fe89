"""Per-row sampling for a decode batch whose rows belong to different requests.

`infer.sampling` compiles one `SamplingConfig` into the program; a server cannot (every request brings its own
temperature, top-k, top-p and seed, and recompiling per mix would stall every slot). Here they are arrays `[B]`:

* temperature 0 is greedy: `argmax` of the vocabulary-masked logits, exactly `infer.sampling.sample`'s greedy;
* otherwise the same top-k then top-p filter as `sampling.filter_logits`, with per-row k and p (k = 0, p = 1: off);
* row b draws with `fold_in(fold_in(key(seed_b), 0), t_b)`: the key `vffn-generate --seed S` gives a single
  prompt (row 0 of its batch) for its token t, so a seeded request samples what `generate.py` samples.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def filter_rows(scaled_bv, top_k_b, top_p_b):
    """`scaled [B, V]` with everything outside each row's top-k / top-p set at -inf (ties at the cut kept)."""
    v = scaled_bv.shape[-1]
    desc = jnp.sort(scaled_bv, axis=-1)[..., ::-1]
    kth = jnp.take_along_axis(desc, jnp.clip(top_k_b - 1, 0, v - 1)[:, None], axis=-1)
    use_k = (top_k_b > 0)[:, None]
    scaled_bv = jnp.where(use_k & (scaled_bv < kth), NEG_INF, scaled_bv)
    desc = jnp.sort(scaled_bv, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep = before < top_p_b[:, None]  # the most likely token is always kept
    cut = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    use_p = (top_p_b < 1.0)[:, None]
    return jnp.where(use_p & (scaled_bv < cut), NEG_INF, scaled_bv)


def row_keys(seed_b, t_b):
    """One key per row: `fold_in(fold_in(key(seed), 0), t)` (see the module docstring)."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 0), t))(seed_b, t_b)


def sample_rows(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, t_b):
    """Token ids `[B]` int32 from vocabulary-masked f32 logits, each row with its own settings."""
    greedy_b = temperature_b <= 0.0
    scaled = logits_bv / jnp.where(greedy_b, 1.0, temperature_b)[:, None]
    # the two sorts of the filters only when some row asks for one (most traffic is greedy or plain sampling)
    scaled = jax.lax.cond(jnp.any(top_k_b > 0) | jnp.any(top_p_b < 1.0), filter_rows, lambda x, k, p: x,
                          scaled, top_k_b, top_p_b)
    drawn = jax.vmap(jax.random.categorical)(row_keys(seed_b, t_b), scaled)
    return jnp.where(greedy_b, jnp.argmax(logits_bv, axis=-1), drawn).astype(jnp.int32)


def top_logprobs(logp_bv, n: int):
    """(ids `[B, n]`, log-probabilities `[B, n]`) of each row's n most likely tokens (n >= 1)."""
    vals, ids = jax.lax.top_k(logp_bv, n)
    return ids.astype(jnp.int32), vals
