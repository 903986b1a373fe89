"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), as pure functions of logits.

`SamplingConfig` is static (hashable): it is part of the compiled decode program, so changing it
recompiles; the random key is data. Each row draws with its own key `fold_in(fold_in(key, row), t)`
(`row` = the prompt's index, `t` = the generated token's index), so a prompt's sample does not depend
on which other prompts share its batch or on the batch padding.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vffn_jax.config import ConfigError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p (1 = all)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate(s: SamplingConfig) -> SamplingConfig:
    """ConfigError naming the flag when a setting is out of range."""
    if not s.temperature >= 0.0:  # also rejects NaN
        raise ConfigError(f"--temperature={s.temperature} must be >= 0 (0 = greedy)")
    if s.top_k < 0:
        raise ConfigError(f"--top-k={s.top_k} must be >= 0 (0 = no top-k filter)")
    if not 0.0 < s.top_p <= 1.0:
        raise ConfigError(f"--top-p={s.top_p} must be in (0, 1] (1 = no nucleus filter)")
    return s


def mask_vocab(logits, valid_vocab: int | None):
    """-inf on the embedding rows beyond the tokenizer's vocabulary (the model's vocab is padded)."""
    if valid_vocab is None or valid_vocab >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, NEG_INF)


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """`logits [..., V]` with everything outside the top-k / top-p set at -inf (ties at the cut are kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, NEG_INF)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted token
        keep = before < top_p  # the first token is always kept
        cut = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cut, logits, NEG_INF)
    return logits


def row_keys(key, row_ids, t):
    """`[B]` keys: `fold_in(fold_in(key, row), t)`."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), t))(row_ids)


def sample(logits, s: SamplingConfig, key, row_ids, t):
    """Token ids `[B]` (int32) from f32 `logits [B, V]` (already vocab-masked)."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = filter_logits(logits / s.temperature, s.top_k, s.top_p)
    keys = row_keys(key, row_ids, t)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def token_logprob(logits, tokens):
    """The model's own log-probability (temperature 1, unfiltered) of `tokens [B]` under `logits [B, V]`."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
