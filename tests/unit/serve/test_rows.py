"""Per-row sampling (vffn_jax/serve/rows.py) is `infer.sampling`'s, row by row: the same filters, greedy, and the
key `generate.py --seed S` gives a single prompt."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vffn_jax.infer import sampling
from vffn_jax.serve import rows


def _logits(b=4, v=50, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, v)) * 3.0


@pytest.mark.parametrize("k,p", [(0, 1.0), (5, 1.0), (0, 0.6), (7, 0.8), (60, 1.0)])
def test_filter_matches_the_static_filter(k, p):
    x = _logits()
    ours = rows.filter_rows(x, jnp.full((4,), k, jnp.int32), jnp.full((4,), p, jnp.float32))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(sampling.filter_logits(x, k, p)))


def test_rows_keep_their_own_settings():
    x = _logits()
    k = jnp.array([0, 3, 0, 1], jnp.int32)
    p = jnp.array([1.0, 1.0, 0.5, 1.0], jnp.float32)
    ours = np.asarray(rows.filter_rows(x, k, p))
    for i in range(4):
        np.testing.assert_array_equal(ours[i], np.asarray(sampling.filter_logits(x[i:i + 1], int(k[i]), float(p[i])))[0])


def test_greedy_and_seeded_rows_match_infer_sampling():
    x = _logits()
    temp = jnp.array([0.0, 0.8, 1.3, 0.0], jnp.float32)
    k = jnp.array([0, 0, 5, 0], jnp.int32)
    p = jnp.array([1.0, 0.9, 1.0, 1.0], jnp.float32)
    seed = jnp.array([3, 11, 12, 4], jnp.int32)
    for t in range(3):
        out = np.asarray(rows.sample_rows(x, temp, k, p, seed, jnp.full((4,), t, jnp.int32)))
        for i in range(4):
            cfg = sampling.SamplingConfig(float(temp[i]), int(k[i]), float(p[i]))
            want = sampling.sample(x[i:i + 1], cfg, jax.random.key(int(seed[i])), jnp.zeros((1,), jnp.int32), t)
            assert out[i] == int(want[0]), (t, i)


def test_top_logprobs():
    logp = jax.nn.log_softmax(_logits(), axis=-1)
    ids, lps = rows.top_logprobs(logp, 3)
    assert ids.shape == (4, 3) and np.all(np.diff(np.asarray(lps), axis=1) <= 0)
    np.testing.assert_array_equal(np.asarray(ids[:, 0]), np.asarray(jnp.argmax(logp, -1)))
