"""Traced FLOPs (loops counted as they run) against the analytic count: equal for the plain model,
larger by the recomputation under remat, larger for moe's dense dispatch; XLA's own count is not."""
import jax
import jax.numpy as jnp
import pytest

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.perf import flop_trace as flop_count
from vffn_jax.perf import flops
from vffn_jax.model import placement
from vffn_jax.train import optimizer
from vffn_jax.train import step as step_lib
from vffn_jax.parallel import sharding as shd
from vffn_jax.config import load_config

SMALL = {"model.n_layers": 3, "model.d_model": 64, "model.n_heads": 2, "model.d_ff": 128, "train.batch_size": 8,
         "train.seq_len": 32, "mesh.data": 1, "model.attention": "xla"}


def _ratio(variant, **over):
    cfg = load_config("tiny", variant, {**SMALL, **over})
    s = placement.setup(cfg, jax.devices()[:1])
    tx = optimizer.make_optimizer(cfg.train)
    abstract_opt, opt_shardings = optimizer.opt_state_shardings(tx, s)
    step = step_lib.make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_shardings)
    args = (ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings),
            ckpt.abstract_with_shardings(abstract_opt, opt_shardings),
            jax.ShapeDtypeStruct((8, 33), jnp.int32, sharding=shd.batch_sharding(s.mesh)),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(s.mesh)))
    counted = flop_count.traced_step_flops(step, *args)
    assert counted["dynamic_loops"] == 0  # training runs every depth loop: no data-dependent trip count
    return counted["flops"] / (flops.flops_per_token(cfg.model, 32, train=True) * 8 * 32)


@pytest.mark.parametrize("variant", ["dense", "kloop", "depth_only", "versatile"])
def test_traced_flops_equal_the_analytic_count(variant):
    assert _ratio(variant) == pytest.approx(1.0, rel=1e-9)
    assert _ratio(variant, **{"model.scan_layers": False}) == pytest.approx(1.0, rel=1e-9)


def test_grouped_query_attention_and_tied_head_flops():
    assert _ratio("dense", **{"model.n_kv_heads": 1, "model.tie_embeddings": True}) == pytest.approx(1.0, rel=1e-9)


def test_remat_and_dense_dispatch_show_up_as_extra_flops():
    assert 1.25 < _ratio("versatile", **{"model.remat": "full"}) < 1.34  # the forward runs twice
    assert _ratio("moe") > 1.2  # every expert runs on every token, the analytic count takes top-k


def test_scan_length_multiplies_and_xla_counts_a_loop_once():
    def f(x, w):
        return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=5)[0]

    x, w = jnp.ones((16, 32)), jnp.ones((32, 32))
    assert flop_count.matmul_flops(jax.make_jaxpr(f)(x, w))["flops"] == 5 * 2 * 16 * 32 * 32
    xla = jax.jit(f).lower(x, w).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert xla["flops"] < 2 * 2 * 16 * 32 * 32  # why the pre-flight walks the jaxpr instead
