"""Depth-compacted inference (model.depth_exec=compact, vffn_jax/model/depth_compact.py) gives the masked loop's
results while running each FFN loop only on the tokens that need it, on one device and sharded."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vffn_jax.config import ModelConfig, load_config
from vffn_jax.model import depth_compact, placement
from vffn_jax.model.transformer import Transformer
from vffn_jax.evals import step as eval_step_lib
from vffn_jax.parallel.sharding import global_batch

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, n_experts=4, top_k=2, max_depth=4,
             init_std=0.2, attention="xla")


def test_each_token_gets_its_own_loops_and_rows_are_counted_per_block():
    """With a loop that adds 1, a token's output is y1 + depth - 1 exactly; the rows run are 1 + sum_l of
    ceil(n_l / block) * block per token (the last block's padding counted)."""
    depth = jnp.asarray([[1, 4, 2, 2, 3, 1, 1, 2], [4, 1, 1, 1, 2, 1, 3, 1]], jnp.int32)
    y1 = jnp.arange(16, dtype=jnp.float32).reshape(2, 8, 1) * 10
    add_one = lambda p, rows, eps: rows + 1
    for block in (1, 2, 3, 64):
        y, executed = depth_compact.compact_depth({}, y1, depth, eps=1e-6, depth_block=block, max_depth=4,
                                                  loop_fn=add_one)
        np.testing.assert_array_equal(y[..., 0], y1[..., 0] + depth - 1)
        b = depth_compact.block_rows(16, block)
        need = [int((depth >= l).sum()) for l in (2, 3, 4)]  # 7, 4, 2 tokens need loops 2, 3, 4
        assert float(executed) == pytest.approx((16 + sum(-(-n // b) * b for n in need)) / 16)
    assert depth_compact.block_rows(16, 64) == 2 and depth_compact.block_rows(4096, 64) == 64


@pytest.mark.parametrize("ffn", ["depth_only", "versatile", "versatile_avg"])
def test_compact_equals_masked_logits_and_depths(ffn):
    outs = {}
    toks = jax.random.randint(jax.random.key(1), (4, 24), 0, 64)
    _, st = nnx.split(Transformer(ModelConfig(**SMALL, ffn=ffn), nnx.Rngs(0)))
    for mode in ("masked", "compact"):
        g, _ = nnx.split(Transformer(ModelConfig(**SMALL, ffn=ffn, depth_exec=mode), nnx.Rngs(0)))
        outs[mode] = jax.jit(lambda s, t: nnx.merge(g, s)(t))(st, toks)
    (lm, am), (lc, ac) = outs["masked"], outs["compact"]
    scale = float(jnp.abs(lm).max())
    np.testing.assert_allclose(lc, lm, atol=1e-5 * max(scale, 1.0))
    np.testing.assert_array_equal(ac["depth"], am["depth"])
    assert len(np.unique(am["depth"])) > 2  # tokens of several depths
    own = np.asarray(am["depth"], np.float32).mean(axis=(1, 2))
    np.testing.assert_array_equal(am["executed_loops"], np.asarray(am["depth"]).max(axis=(1, 2)))
    assert (np.asarray(ac["executed_loops"]) >= own).all() and (ac["executed_loops"] < am["executed_loops"]).all()


def test_compact_equals_masked_on_a_mesh():
    """Held-out statistics of the eval step on a (2, 2, 2) mesh: each device compacts its own tokens."""
    over = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.d_ff": 128, "model.init_std": 0.2,
            "train.batch_size": 8, "train.seq_len": 32, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
            "model.attention": "xla"}
    batch = np.asarray(jax.random.randint(jax.random.key(0), (8, 33), 0, 257))
    outs = {}
    for mode in ("masked", "compact"):
        cfg = load_config("tiny", "versatile", {**over, "model.depth_exec": mode})
        s = placement.setup(cfg, jax.devices())
        _, params, _ = placement.init_params(cfg.model, s.mesh, 0)
        step = eval_step_lib.make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)
        if mode == "compact":  # compacted per device: a manual (shard_map) region over the batch axes
            hlo = step.lower(params, global_batch(batch, s.mesh)).as_text()
            assert "sdy.manual_computation" in hlo or "shard_map" in hlo
        outs[mode] = jax.device_get(step(params, global_batch(batch, s.mesh)))
    m, c = outs["masked"], outs["compact"]
    np.testing.assert_allclose(c["ce_sum"] / c["tokens"], m["ce_sum"] / m["tokens"], rtol=1e-5)
    np.testing.assert_array_equal(c["depth_hist"], m["depth_hist"])
    assert (c["executed_depth"] < m["executed_depth"]).all()
