"""Comparisons that do not confound (issue 12, parts 1-3): the paper's width ablation (`width_shared`), inference
FLOPs three ways (ideal / executed / paper), the run-length Gumbel schedule, the continuation stage's own data
order and the len_norm convention. Everything here is small: seconds on CPU."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vffn_jax.model import ffn
from vffn_jax.perf import flops
from vffn_jax.study.plan import plan
from vffn_jax.study.presets import VARIANTS, continued_shuffle_seed
from vffn_jax.study.stats import ordering_verdict
from vffn_jax.model import placement
from vffn_jax.train import optimizer
from vffn_jax.train import step as step_lib
from vffn_jax.data import mc_tasks as mc
from vffn_jax.config import ConfigError, FFN_KINDS, ModelConfig, TrainConfig, load_config, tau_at, tau_decay_per_step
from vffn_jax.data.tokenizer import ByteTokenizer

D, F, E, K, L = 16, 64, 8, 2, 4


def make_params(seed=0, n_experts=E, router_scale=1.0):
    ks = jax.random.split(jax.random.key(seed), 5)
    return {"norm_scale": 1.0 + 0.1 * jax.random.normal(ks[0], (D,)),
            "w_gate": 0.3 * jax.random.normal(ks[1], (D, F)), "w_up": 0.3 * jax.random.normal(ks[2], (D, F)),
            "w_down": 0.3 * jax.random.normal(ks[3], (F, D)),
            "expert_router": router_scale * jax.random.normal(ks[4], (D, n_experts))}


def inputs(seed=1, shape=(3, 5, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def np_rms(z, scale, eps=1e-6):
    return z / np.sqrt(np.mean(z * z, -1, keepdims=True) + eps) * scale


def np_act(p, z, units=slice(None)):
    n = np_rms(z, p["norm_scale"])
    g = n @ p["w_gate"][:, units]
    return g / (1 + np.exp(-g)) * (n @ p["w_up"][:, units])


def np_loop(p, z):
    """FFN(z) = z + act(z) W_down."""
    return z + np_act(p, z) @ p["w_down"]


def np_expert(p, z, i, n_experts):
    """FFN_i(z) = z + act(z)[S_i] W_down[S_i]: from the sliced weights only."""
    s = slice(i * F // n_experts, (i + 1) * F // n_experts)
    return z + np_act(p, z, s) @ p["w_down"][s]

# --------------------------------------------------------------------------- 1. width_shared


def np_width_shared(p, x, n_experts, top_k):
    """Per token, from the sliced weights: the shared expert (the full FFN, its residual) plus the top-k routed
    virtual experts' contributions `w_j (FFN_j(x) - x)`, softmax over the selected logits; one residual."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    out = []
    for xt in np.asarray(x, np.float64).reshape(-1, x.shape[-1]):
        logits = xt @ p["expert_router"]
        idx = np.argsort(-logits)[:top_k]
        w = np.exp(logits[idx] - logits[idx].max())
        y = np_loop(p, xt)  # x + act(x) W_down
        for w_j, i in zip(w / w.sum(), idx):
            y = y + w_j * (np_expert(p, xt, i, n_experts) - xt)
        out.append(y)
    return np.stack(out).reshape(x.shape)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("n_experts,top_k", [(8, 2), (4, 1), (4, 4)])
def test_width_shared_equals_per_expert_reference(n_experts, top_k, train):
    p = make_params(n_experts=n_experts)
    x = inputs()
    kw = dict(train=True, tau=1.0, rng=jax.random.key(7)) if train else {}
    y, aux = ffn.apply_ffn("width_shared", p, x, n_experts=n_experts, top_k=top_k, max_depth=L, **kw)
    np.testing.assert_allclose(y, np_width_shared(p, x, n_experts, top_k), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.sum(aux["expert_load"]), 1.0, rtol=1e-6)
    assert {"balance_loss", "z_loss", "router_entropy", "router_prob"} <= set(aux) and "depth" not in aux
    # the shared expert is the dense FFN, the routed part the width_only path's increment
    dense, width = ffn.dense_ffn(p, x)[0], ffn.width_ffn(p, x, n_experts=n_experts, top_k=top_k)[0]
    np.testing.assert_allclose(y, dense + width - x, rtol=1e-5, atol=1e-5)
    shapes = ffn.param_shapes("width_shared", D, F, n_experts, L)
    assert {k: v[0] for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in p.items()}
    assert shapes["expert_router"][1] == ("embed", None) and shapes["w_down"][1] == ("mlp", "embed")


def test_width_shared_gradients_reach_router_and_all_weights():
    p = make_params(router_scale=0.1)
    x = inputs(shape=(4, 16, D))

    def loss(params):
        y, aux = ffn.width_shared_ffn(params, x, n_experts=E, top_k=K)
        return jnp.sum(y ** 2) + aux["balance_loss"]

    grads = jax.jit(jax.grad(loss))(p)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0, name
    # the router's gradient through the output alone (not only through the balance loss)
    g_out = jax.grad(lambda prm: jnp.sum(ffn.width_shared_ffn(prm, x, n_experts=E, top_k=K)[0] ** 2))(p)
    assert float(jnp.abs(g_out["expert_router"]).max()) > 0


def test_width_shared_in_the_model_counts_and_configs():
    assert "width_shared" in FFN_KINDS
    cfg = load_config("tiny", "width_shared")
    assert cfg.model.ffn == "width_shared" and cfg.variant == "width_shared"
    with pytest.raises(ConfigError, match=r"model\.n_experts"):
        load_config("tiny", "width_shared", {"model.d_ff": 500})  # f % E != 0
    from vffn_jax.config import validate
    with pytest.raises(ConfigError, match="tensor-parallel"):  # E % tensor: each virtual expert on one device
        validate(load_config("tiny", "width_shared", {"model.n_experts": 4, "model.d_ff": 768, "mesh.tensor": 3,
                                                     "model.n_heads": 3, "model.d_model": 96, "model.vocab_size": 384,
                                                     "mesh.data": 1}), n_devices=3)
    info = placement.describe(placement.setup(load_config("354m", "width_shared")))
    assert info["params_total"] == info["params_analytic"] == 354_712_576 + 15 * 1024 * 8
    assert info["shardings"]["layers/ffn/expert_router"]["shape"] == [15, 1024, 8]
    dense = load_config("354m", "dense").model
    m = load_config("354m", "width_shared").model
    # one dense FFN (the routed experts reuse its hidden units: one down-projection) + the router
    assert flops.ffn_forward_flops(m, train=True) == flops.ffn_forward_flops(dense, train=True) + 2 * 1024 * 8
    assert info["paper_ffn_vs_dense"] == pytest.approx(1 + 2 / 8)


def test_width_shared_trains_one_step_on_a_mesh():
    cfg = load_config("tiny", "width_shared", {"model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2,
                                               "model.d_ff": 64, "train.batch_size": 4, "train.seq_len": 16,
                                               "mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2})
    devices = jax.devices()[:4]
    s = placement.setup(cfg, devices)
    tx = optimizer.make_optimizer(cfg.train)
    _, opt_sh = optimizer.opt_state_shardings(tx, s)
    params, opt_state = optimizer.init_train_state(s, tx, opt_sh)
    step = step_lib.make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_sh)
    batch = np.asarray(jax.random.randint(jax.random.key(0), (4, 17), 0, 256), np.int32)
    _, _, metrics = step(params, opt_state, step_lib.global_batch(batch, s.mesh), 0)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["balance_loss"]) > 0
    assert np.asarray(metrics["expert_load"]).shape == (2, cfg.model.n_experts)


# --------------------------------------------------------------------------- 2. inference FLOPs three ways


def _m(ffn_kind, **kw):
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
    cfg = load_config("tiny", "versatile", {"model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2,
                                            "model.d_ff": 64, "train.batch_size": 4, "train.seq_len": 16,
                                            "mesh.data": 1, "train.grad_accum": 2, "model.depth_exec": depth_exec})
    s = placement.setup(cfg, jax.devices()[:1])
    _, params, _ = placement.init_params(cfg.model, s.mesh, 0)
    params = jax.tree.map(lambda a: a * 20 if a.ndim == 3 and a.shape[-1] == cfg.model.max_depth else a, params)
    batch = np.asarray(jax.random.randint(jax.random.key(0), (4, 17), 0, 256), np.int32)
    out = jax.device_get(step_lib.make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)(
        params, step_lib.global_batch(batch, s.mesh)))
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


# --------------------------------------------------------------------------- 3. schedule, data order, len_norm


def test_tau_decay_scales_with_run_length():
    for steps in (250, 25431, 190735):
        t = TrainConfig(steps=steps)  # tau_decay 0 (derive), tau_decay_frac 0.96
        floor = 0.96 * steps
        assert float(tau_at(math.floor(floor) - 1, t)) > t.tau_end
        assert float(tau_at(math.ceil(floor), t)) == pytest.approx(t.tau_end)
    cpu = load_config("study_cpu").train  # was 0.98 per step: the floor at 78% of its 250 steps
    assert math.log(cpu.tau_end / cpu.tau_start) / math.log(tau_decay_per_step(cpu)) == pytest.approx(0.96 * 250)
    explicit = TrainConfig(steps=250, tau_decay=0.98)  # an explicit per-step factor takes precedence
    assert tau_decay_per_step(explicit) == 0.98
    assert float(tau_at(100, explicit)) == pytest.approx(5.0 * 0.98 ** 100, rel=1e-5)
    frac1 = TrainConfig(steps=100, tau_decay_frac=1.0)
    assert float(tau_at(99, frac1)) > 0.1 and float(tau_at(100, frac1)) == pytest.approx(0.1)
    for bad in ({"train.tau_decay_frac": 0.0}, {"train.tau_decay_frac": 1.5}, {"train.tau_decay": 1.2},
                {"train.tau_decay": -0.1}):
        with pytest.raises(ConfigError, match="tau_decay"):
            load_config("tiny", "versatile", bad)
    assert tau_decay_per_step(load_config("tiny", "versatile", {"train.tau_decay": 0.99}).train) == 0.99


def test_continued_runs_have_their_own_data_order(tmp_path):
    runs = plan("354m", tmp_path, seeds=3)
    base = runs[0]
    assert base.regime == "base" and base.cfg.data.shuffle_seed == 0
    scratch = {r.seed: r.cfg.data.shuffle_seed for r in runs if r.regime == "scratch" and r.variant == "dense"}
    cont = {r.seed: r.cfg.data.shuffle_seed for r in runs if r.regime == "continued" and r.variant == "dense"}
    assert scratch == {0: 0, 1: 1, 2: 2}
    assert len(set(cont.values())) == 3 and not set(cont.values()) & {0, 1, 2}
    assert cont == {k: continued_shuffle_seed(k) for k in range(3)}
    assert all(r.cfg.data.shuffle_seed == cont[r.seed] for r in runs if r.regime == "continued")
    assert "width_shared" in VARIANTS


def test_ordering_uses_width_shared_and_reports_width_only():
    losses = {"versatile": [2.00], "depth_only": [2.05], "width_shared": [2.06], "width_only": [2.15],
              "dense": [2.10]}
    v = ordering_verdict(losses)
    assert v["held"] is True
    assert ("versatile", "width_shared") in [(c["better"], c["worse"]) for c in v["comparisons"]]
    assert "width_shared 2.0600" in v["sentence"]
    assert "width_only (the k routed slices alone" in v["sentence"] and "NOT below dense (2.1000)" in v["sentence"]
    assert [c["held"] for c in v["width_only_check"]] == [True, False]
    assert "width_only" not in ordering_verdict({k: x for k, x in losses.items() if k != "width_only"})["sentence"]


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
