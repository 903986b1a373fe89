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
from vffn_jax.evals import step as eval_step_lib
from vffn_jax.parallel.sharding import global_batch

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


# --------------------------------------------------------------------------- inference FLOPs three ways
# (ideal / executed / paper; moved from tests/unit/study/test_fair_ablations.py)


def _m(ffn_kind, **kw):
    from vffn_jax.config import ModelConfig

    return ModelConfig(**{"vocab_size": 64, "d_model": 16, "n_layers": 3, "n_heads": 2, "d_ff": 64, "n_experts": 8,
                          "top_k": 2, "max_depth": 4, "ffn": ffn_kind, **kw})


def test_inference_flops_three_ways_formulas():
    d, f, T, n = 16, 64, 32, 3
    loop = 6 * d * f
    m = _m("versatile")
    fl = flops.inference_flops(m, T, mean_depth=1.5, executed_depth=3.25, width_fraction=0.75)
    base = n * (8 * d * d + 4 * T * d + 2 * d * (8 + 4)) + 2 * d * 64  # attention, routers, lm_head
    assert fl["ideal"] == pytest.approx(base + n * (1.5 * loop + 2 * d * f))
    assert fl["executed"] == pytest.approx(base + n * (3.25 * loop + 2 * d * f))
    assert fl["paper_ffn_vs_dense"] == pytest.approx(1.5 + 0.25 * 0.75)  # E[depth] + (k/E) P(depth < L)
    assert fl["paper"] == pytest.approx(n * loop * (1.5 + 0.25 * 0.75))
    assert fl["ideal"] == flops.flops_per_token(m, T, train=False, mean_depth=1.5)
    # without a measurement: depth uniform over 1..L, executed at L
    fl0 = flops.inference_flops(m, T)
    assert (fl0["depth_ideal"], fl0["depth_executed"]) == (2.5, 4.0)
    assert fl0["paper_ffn_vs_dense"] == pytest.approx(2.5 + 0.25 * 3 / 4)
    mult = {"dense": 1, "kloop": 3, "width_only": 0.25, "width_shared": 1.25, "moe": 1.25}
    for kind, want in mult.items():
        fk = flops.inference_flops(_m(kind, n_loops=3), T, mean_depth=2.0, executed_depth=4.0)
        assert fk["paper_ffn_vs_dense"] == pytest.approx(want), kind
        assert fk["depth_ideal"] is None and fk["depth_executed"] is None
        if kind != "moe":
            assert fk["ideal"] == fk["executed"], kind  # no depth router: nothing else differs
    moe = flops.inference_flops(_m("moe"), T)
    assert moe["executed"] - moe["ideal"] == pytest.approx(n * loop * (1 - 2 / 8))  # dense dispatch runs all E
    assert flops.inference_flops(_m("versatile_avg"), T, mean_depth=2.0)["paper_ffn_vs_dense"] == 2.25
    assert flops.inference_flops(_m("depth_only"), T, mean_depth=2.0)["paper_ffn_vs_dense"] == 2.0


@pytest.mark.parametrize("depth_exec", ["masked", "compact"])
def test_eval_step_returns_the_loops_it_executed(depth_exec):
    """The eval step's `executed_depth` (the FFN loops per token the inference program ran, the input of the
    executed FLOPs) against a reference from the per-token depths."""
    import dataclasses

    import numpy as np

    cfg = load_config("tiny", "versatile", {"model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2,
                                            "model.d_ff": 64, "train.batch_size": 4, "train.seq_len": 16,
                                            "mesh.data": 1, "train.grad_accum": 2, "model.depth_exec": depth_exec})
    s = placement.setup(cfg, jax.devices()[:1])
    # the same weights for both depth_exec values (they do not depend on it): one init program, compiled once
    _, params, _ = placement.init_params(dataclasses.replace(cfg.model, depth_exec="masked"), s.mesh, 0)
    params = jax.tree.map(lambda a: a * 20 if a.ndim == 3 and a.shape[-1] == cfg.model.max_depth else a, params)
    batch = np.asarray(jax.random.randint(jax.random.key(0), (4, 17), 0, 256), np.int32)
    out = jax.device_get(eval_step_lib.make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)(
        params, global_batch(batch, s.mesh)))
    # the reference, per layer of each microbatch (rows j, j+2, ...), averaged over microbatches: masked runs
    # every token to the microbatch's deepest one; compact runs loop l on the n_l tokens that need it, in
    # blocks of b rows (32 tokens per microbatch: b = 4), the last block's padding counted
    _, (_, aux) = step_lib.forward_loss(s.graphdef, params, jnp.asarray(batch), cfg, train=False)
    depth = np.asarray(aux["depth"])  # [layers, B, T]

    def executed(d):  # [B', T] -> loops per token
        if depth_exec == "masked":
            return d.max()
        return (d.size + sum(-(-int((d >= l).sum()) // 4) * 4 for l in range(2, 5))) / d.size

    want = np.mean([[executed(depth[i, j::2]) for i in range(2)] for j in range(2)], axis=0)
    np.testing.assert_allclose(out["executed_depth"], want)
    assert (np.asarray(out["executed_depth"]) >= np.asarray(depth.mean(axis=(1, 2)))).all()


def test_dry_run_reports_three_inference_figures():
    info = placement.describe(placement.setup(load_config("354m", "versatile")))
    assert info["inference_depth_assumed"] == 2.5 and info["inference_executed_depth_assumed"] == 4.0
    assert info["flops_per_token_inference"] < info["flops_per_token_inference_executed"]
    assert info["flops_per_token_inference_paper"] == pytest.approx(15 * 6 * 1024 * 4096 * (2.5 + 0.25 * 0.75))
