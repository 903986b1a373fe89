"""Downstream multiple-choice scoring conventions (vffn_jax/evals/tasks.py): the len_norm divisor."""
import numpy as np
import pytest

from vffn_jax.config import ConfigError
from vffn_jax.evals import tasks as mc
from vffn_jax.data.tokenizer import ByteTokenizer


def test_len_norm_conventions():
    exs = [mc.Example(("c",) * 2, (" ab", " b"), 0)]  # sums -2 vs -1.2: olmo1 -1 vs -1.2 -> 0; olmo-eval -0.67 vs -0.6
    r = mc.build_requests(exs, ByteTokenizer(), seq_len=64)
    sums = np.array([-2.0, -1.2])
    assert mc.choice_metrics(sums, r, exs)["len_norm"] == 1.0  # default: olmo1 (OLMo-1, the paper's evaluator)
    assert mc.choice_metrics(sums, r, exs, "olmo1")["len_norm"] == 1.0
    assert mc.choice_metrics(sums, r, exs, "olmo-eval")["len_norm"] == 0.0
    np.testing.assert_array_equal(mc.len_norm_divisor(np.array([3, 2, 1]), "olmo1"), [2, 1, 1])
    np.testing.assert_array_equal(mc.len_norm_divisor(np.array([3, 2, 1]), "olmo-eval"), [3, 2, 1])
    assert mc.DEFAULT_LEN_NORM == "olmo1"
    with pytest.raises(ConfigError, match="len-norm"):
        mc.len_norm_divisor(np.array([3]), "olmo2")
