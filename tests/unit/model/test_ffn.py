"""VersatileFFN math against independent per-token / per-expert reference implementations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vffn_jax.model import ffn
from vffn_jax.parallel.sharding import global_batch

D, F, E, K, L = 16, 64, 8, 2, 4


def make_params(seed=0, d=D, f=F, n_experts=E, max_depth=L, router_scale=1.0):
    ks = jax.random.split(jax.random.key(seed), 6)
    return {
        "norm_scale": 1.0 + 0.1 * jax.random.normal(ks[0], (d,)),
        "w_gate": 0.3 * jax.random.normal(ks[1], (d, f)),
        "w_up": 0.3 * jax.random.normal(ks[2], (d, f)),
        "w_down": 0.3 * jax.random.normal(ks[3], (f, d)),
        "expert_router": router_scale * jax.random.normal(ks[4], (d, n_experts)),
        "depth_router": router_scale * jax.random.normal(ks[5], (d, max_depth)),
    }


def inputs(seed=1, shape=(3, 5, D)):
    return jax.random.normal(jax.random.key(seed), shape)


# ---------------------------------------------------------------- independent numpy references


def np_rms(z, scale, eps=1e-6):
    return z / np.sqrt(np.mean(z * z, -1, keepdims=True) + eps) * scale


def np_silu(z):
    return z / (1 + np.exp(-z))


def np_expert(p, z, i, n_experts):
    """FFN_i(z) = z + act(z)[S_i] W_down[S_i]: computed from the sliced weights only."""
    f = p["w_gate"].shape[1]
    s = slice(i * f // n_experts, (i + 1) * f // n_experts)
    n = np_rms(z, p["norm_scale"])
    return z + (np_silu(n @ p["w_gate"][:, s]) * (n @ p["w_up"][:, s])) @ p["w_down"][s]


def np_loop(p, z):
    n = np_rms(z, p["norm_scale"])
    return z + (np_silu(n @ p["w_gate"]) * (n @ p["w_up"])) @ p["w_down"]


def np_width(p, x_token, n_experts, top_k):
    logits = x_token @ p["expert_router"]
    idx = np.argsort(-logits)[:top_k]
    w = np.exp(logits[idx] - logits[idx].max())
    w = w / w.sum()
    return sum(w_j * np_expert(p, x_token, i, n_experts) for w_j, i in zip(w, idx))


def np_versatile(p, x, n_experts, top_k, depths=None, fixed_alpha=None):
    """Per-token reference; `depths` forces the loop count (e.g. the one sampled in training);
    `fixed_alpha` replaces the depth-derived gate (the versatile_avg ablation)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    flat = x.reshape(-1, x.shape[-1])
    max_depth = p["depth_router"].shape[1]
    out = []
    for t, xt in enumerate(flat):
        depth = int(np.argmax(xt @ p["depth_router"])) + 1 if depths is None else int(depths.reshape(-1)[t])
        y = xt
        for _ in range(depth):
            y = np_loop(p, y)
        alpha = (max_depth - depth) / max_depth if fixed_alpha is None else fixed_alpha
        out.append((1 - alpha) * y + alpha * np_width(p, xt, n_experts, top_k))
    return np.stack(out).reshape(x.shape)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("n_experts,top_k", [(8, 2), (4, 1), (8, 8), (2, 2)])
def test_width_path_equals_per_expert_reference(n_experts, top_k):
    p = make_params(n_experts=n_experts)
    x = inputs()
    y, aux = ffn.width_ffn(p, x, n_experts=n_experts, top_k=top_k)
    ref = np.stack([np_width({k: np.asarray(v, np.float64) for k, v in p.items()}, xt, n_experts, top_k)
                    for xt in np.asarray(x, np.float64).reshape(-1, D)]).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.sum(aux["expert_load"]), 1.0, rtol=1e-6)


def test_versatile_inference_equals_reference():
    p = make_params()
    x = inputs()
    y, aux = ffn.versatile_ffn(p, x, n_experts=E, top_k=K, max_depth=L)
    np.testing.assert_allclose(y, np_versatile(p, x, E, K), rtol=2e-4, atol=2e-4)
    assert aux["depth"].dtype == jnp.int32 and aux["depth"].shape == x.shape[:-1]
    assert set(np.unique(aux["depth"])) > {1}, "test inputs should exercise several depths"
    np.testing.assert_allclose(aux["alpha"], (L - aux["depth"]) / L)


def test_while_loop_inference_equals_run_all_and_select():
    p = make_params()
    x = inputs(shape=(4, 7, D))
    depth = jax.random.randint(jax.random.key(3), x.shape[:-1], 1, L + 1).astype(jnp.int32)
    y1 = ffn.ffn_loop(p, x)
    got = ffn.depth_infer(p, y1, depth, eps=1e-6)
    outs = [y1]
    for _ in range(L - 1):
        outs.append(ffn.ffn_loop(p, outs[-1]))
    want = jnp.take_along_axis(jnp.stack(outs, -2), (depth - 1)[..., None, None], axis=-2)[..., 0, :]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the loop stops at the batch's deepest token: all-depth-1 batches run no extra loop
    shallow = ffn.depth_infer(p, y1, jnp.ones_like(depth), eps=1e-6)
    np.testing.assert_array_equal(shallow, y1)
    jaxpr = str(jax.make_jaxpr(lambda a, b: ffn.depth_infer(p, a, b, eps=1e-6))(y1, depth))
    assert "while" in jaxpr


def test_inference_active_mask_and_width_skip():
    """`active` (the decoder's padding / finished rows): inactive tokens run depth 1, active tokens keep their
    output; when every active token runs all L loops the width path is skipped, which changes nothing."""
    p = make_params()
    x = inputs(shape=(4, 7, D))
    kw = dict(n_experts=E, top_k=K, max_depth=L)
    y, aux = ffn.versatile_ffn(p, x, **kw)
    assert len(np.unique(aux["depth"])) > 2
    active = (aux["depth"] > 1) & (jnp.arange(7) % 2 == 0)
    y_m, aux_m = ffn.versatile_ffn(p, x, active=active, **kw)
    np.testing.assert_array_equal(aux_m["depth"], jnp.where(active, aux["depth"], 1))
    np.testing.assert_allclose(y_m[active], y[active], rtol=1e-6, atol=1e-6)
    deepest = aux["depth"] == L
    y_d, _ = ffn.versatile_ffn(p, x, active=deepest, **kw)
    np.testing.assert_array_equal(y_d[deepest], y[deepest])  # alpha = 0 there: the width path added exactly 0
    jaxpr = str(jax.make_jaxpr(lambda a, m: ffn.versatile_ffn(p, a, active=m, **kw))(x, deepest))
    assert "cond" in jaxpr
    _, aux_d = ffn.depth_ffn(p, x, max_depth=L, active=active)
    np.testing.assert_array_equal(aux_d["depth"], jnp.where(active, aux["depth"], 1))
    with pytest.raises(ValueError, match="inference"):
        ffn.versatile_ffn(p, x, train=True, rng=jax.random.key(0), active=active, **kw)


def test_train_forward_equals_inference_formula_at_sampled_depths():
    p = make_params()
    x = inputs()
    y, aux = ffn.versatile_ffn(p, x, n_experts=E, top_k=K, max_depth=L, train=True, tau=1.0, rng=jax.random.key(7))
    assert len(np.unique(aux["depth"])) > 1
    np.testing.assert_allclose(y, np_versatile(p, x, E, K, depths=np.asarray(aux["depth"])), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(aux["alpha"], (L - aux["depth"]) / L, atol=1e-6)


def test_train_gradients_reach_both_routers_and_all_ffn_weights():
    p = make_params(router_scale=0.1)
    x = inputs()

    def loss(params):
        y, aux = ffn.versatile_ffn(params, x, n_experts=E, top_k=K, max_depth=L, train=True, tau=2.0,
                                   rng=jax.random.key(0))
        return jnp.sum(y ** 2) + aux["balance_loss"]

    grads = jax.jit(jax.grad(loss))(p)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
        assert float(jnp.abs(g).sum()) > 1e-6, f"no gradient reaches {name}"


def test_depth_router_gets_gradient_through_alpha_and_loop_weights():
    """Both paths of docs/method.md: via g in x_depth and via alpha; either alone gives a non-zero gradient."""
    p = make_params(router_scale=0.1)
    x = inputs()
    rng = jax.random.key(0)

    def depth_part(dr):
        y, _ = ffn.depth_ffn({**p, "depth_router": dr}, x, max_depth=L, train=True, tau=2.0, rng=rng)
        return jnp.sum(y ** 2)

    def alpha_part(dr):
        _, aux = ffn.versatile_ffn({**p, "depth_router": dr}, x, n_experts=E, top_k=K, max_depth=L,
                                   train=True, tau=2.0, rng=rng)
        return jnp.sum(aux["alpha"])

    assert float(jnp.abs(jax.grad(depth_part)(p["depth_router"])).sum()) > 1e-6
    assert float(jnp.abs(jax.grad(alpha_part)(p["depth_router"])).sum()) > 1e-6


def test_gumbel_sampling_follows_router_and_temperature():
    logits = jnp.log(jnp.array([0.7, 0.1, 0.1, 0.1]))
    g = ffn.straight_through_gumbel(jnp.broadcast_to(logits, (20000, 4)), 1.0, jax.random.key(0))
    freq = np.asarray(g).mean(0)
    np.testing.assert_allclose(freq, [0.7, 0.1, 0.1, 0.1], atol=0.02)  # Gumbel-max samples the softmax
    np.testing.assert_array_equal(np.asarray(g).sum(-1), 1.0)  # hard one-hot in the forward pass


def test_depth_only_is_pure_depth_path():
    p = make_params()
    x = inputs()
    y, aux = ffn.depth_ffn(p, x, max_depth=L)
    depth = np.asarray(aux["depth"])
    ref = np.asarray(x, np.float64)
    pp = {k: np.asarray(v, np.float64) for k, v in p.items()}
    flat = ref.reshape(-1, D).copy()
    for t in range(flat.shape[0]):
        for _ in range(depth.reshape(-1)[t]):
            flat[t] = np_loop(pp, flat[t])
    np.testing.assert_allclose(y, flat.reshape(x.shape), rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(aux["alpha"], 0.0)


def test_kloop_with_one_loop_equals_dense_and_k_loops_iterate():
    p = make_params()
    x = inputs()
    dense, _ = ffn.dense_ffn(p, x)
    np.testing.assert_allclose(ffn.kloop_ffn(p, x, n_loops=1)[0], dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ffn.kloop_ffn(p, x, n_loops=3)[0], ffn.ffn_loop(p, ffn.ffn_loop(p, dense)),
                               rtol=1e-5, atol=1e-5)


def test_width_only_with_all_experts_selected():
    """top_k == E: with one expert the width path is the dense FFN exactly; with E > 1 every slice is
    active, weighted by the softmax over all E logits (docs/method.md's formula)."""
    p1 = make_params(n_experts=1)
    x = inputs()
    np.testing.assert_allclose(ffn.width_ffn(p1, x, n_experts=1, top_k=1)[0], ffn.dense_ffn(p1, x)[0],
                               rtol=1e-6, atol=1e-6)
    p = make_params()
    weights = jax.nn.softmax(x @ p["expert_router"], -1)
    hidden = ffn.swiglu_hidden(p, x)
    mask = jnp.repeat(weights, F // E, axis=-1)
    np.testing.assert_allclose(ffn.width_ffn(p, x, n_experts=E, top_k=E)[0], x + (hidden * mask) @ p["w_down"],
                               rtol=1e-5, atol=1e-5)


def test_balance_loss_is_one_for_perfect_balance_and_larger_when_skewed():
    n = 4096
    uniform = jnp.zeros((n, E))
    idx = jnp.stack([jnp.arange(n) % E, (jnp.arange(n) + 1) % E], -1)
    np.testing.assert_allclose(ffn.router_stats(uniform, idx, E)["balance_loss"], 1.0, rtol=1e-6)
    skewed = jnp.zeros((n, E)).at[:, 0].set(5.0)
    idx0 = jnp.stack([jnp.zeros(n, int), jnp.ones(n, int)], -1)
    assert float(ffn.router_stats(skewed, idx0, E)["balance_loss"]) > 2.0


def test_remat_loops_and_bf16_agree_with_reference():
    p = make_params()
    x = inputs()
    kw = dict(n_experts=E, top_k=K, max_depth=L, train=True, tau=1.0, rng=jax.random.key(1))
    loss = lambda prm, remat: jnp.sum(ffn.versatile_ffn(prm, x, remat_loops=remat, **kw)[0] ** 2)
    g0, g1 = jax.grad(loss)(p, False), jax.grad(loss)(p, True)
    for k in g0:
        np.testing.assert_allclose(g0[k], g1[k], rtol=1e-5, atol=1e-5)
    y32, _ = ffn.versatile_ffn(p, x, n_experts=E, top_k=K, max_depth=L)
    y16, _ = ffn.versatile_ffn(p, x.astype(jnp.bfloat16), n_experts=E, top_k=K, max_depth=L, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.1, atol=0.15)


# ---------------------------------------------------------------- versatile_avg and the moe baseline


@pytest.mark.parametrize("train", [False, True])
def test_versatile_avg_is_half_width_half_depth(train):
    p = make_params()
    x = inputs()
    kw = dict(train=True, tau=1.0, rng=jax.random.key(7)) if train else {}
    y, aux = ffn.apply_ffn("versatile_avg", p, x, n_experts=E, top_k=K, max_depth=L, **kw)
    depth = np.asarray(aux["depth"])
    assert len(np.unique(depth)) > 1, "test inputs should exercise several depths"
    if not train:  # the depth router still decides the depth: argmax of its logits at inference
        np.testing.assert_array_equal(depth, np.argmax(np.asarray(x @ p["depth_router"]), -1) + 1)
    np.testing.assert_allclose(y, np_versatile(p, x, E, K, depths=depth, fixed_alpha=0.5), rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(aux["alpha"], 0.5)
    assert {"expert_load", "balance_loss", "depth_entropy"} <= set(aux)


def moe_params(seed=0, d=D, f=F, n_experts=E, router_scale=1.0):
    p = {k: v for k, v in make_params(seed, d, f, n_experts, router_scale=router_scale).items() if k != "depth_router"}
    ks = jax.random.split(jax.random.key(seed + 100), 3)
    h = f // n_experts
    p["expert_w_gate"] = 0.3 * jax.random.normal(ks[0], (n_experts, d, h))
    p["expert_w_up"] = 0.3 * jax.random.normal(ks[1], (n_experts, d, h))
    p["expert_w_down"] = 0.3 * jax.random.normal(ks[2], (n_experts, h, d))
    return p


def np_moe(p, x, n_experts, top_k):
    """Per token: dense SwiGLU + sum over the top-k experts (softmax over the selected logits) of each
    real expert's own SwiGLU; one residual."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    out = []
    for xt in np.asarray(x, np.float64).reshape(-1, x.shape[-1]):
        n = np_rms(xt, p["norm_scale"])
        y = np_loop(p, xt)
        logits = xt @ p["expert_router"]
        idx = np.argsort(-logits)[:top_k]
        w = np.exp(logits[idx] - logits[idx].max())
        for w_j, i in zip(w / w.sum(), idx):
            y = y + w_j * (np_silu(n @ p["expert_w_gate"][i]) * (n @ p["expert_w_up"][i])) @ p["expert_w_down"][i]
        out.append(y)
    return np.stack(out).reshape(x.shape)


@pytest.mark.parametrize("n_experts,top_k", [(8, 2), (4, 1), (4, 4)])
def test_moe_equals_per_token_per_expert_reference(n_experts, top_k):
    p = moe_params(n_experts=n_experts)
    x = inputs()
    y, aux = ffn.apply_ffn("moe", p, x, n_experts=n_experts, top_k=top_k, max_depth=L, train=True, rng=None)
    np.testing.assert_allclose(y, np_moe(p, x, n_experts, top_k), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.sum(aux["expert_load"]), 1.0, rtol=1e-6)
    assert {"balance_loss", "z_loss", "router_entropy"} <= set(aux) and "depth" not in aux
    shapes = ffn.param_shapes("moe", D, F, n_experts, L)
    assert {k: v[0] for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in p.items()}


def output_and_balance_grads(fn, p, x):
    """Gradients of sum(y^2) + balance loss of the routed FFN `fn` (E experts, top-K) at `p`, `x`."""
    def loss(params):
        y, aux = fn(params, x, n_experts=E, top_k=K)
        return jnp.sum(y ** 2) + aux["balance_loss"]

    return jax.jit(jax.grad(loss))(p)


def test_moe_gradients_reach_router_and_every_expert():
    grads = output_and_balance_grads(ffn.moe_ffn, moe_params(router_scale=0.1), inputs(shape=(4, 16, D)))
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
        assert float(jnp.abs(g).sum()) > 1e-6, f"no gradient reaches {name}"
    for name in ("expert_w_gate", "expert_w_up", "expert_w_down"):  # each expert got tokens, so each learns
        per_expert = np.abs(np.asarray(grads[name])).reshape(E, -1).sum(-1)
        assert np.all(per_expert > 0), (name, per_expert)


# ---------------------------------------------------------------- width_shared: the paper's width ablation
# (moved from tests/unit/study/test_fair_ablations.py)


def width_shared_params(seed=0, n_experts=E, router_scale=1.0):
    """The FFN's weights and the expert router (width_shared has no depth router)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    return {"norm_scale": 1.0 + 0.1 * jax.random.normal(ks[0], (D,)),
            "w_gate": 0.3 * jax.random.normal(ks[1], (D, F)), "w_up": 0.3 * jax.random.normal(ks[2], (D, F)),
            "w_down": 0.3 * jax.random.normal(ks[3], (F, D)),
            "expert_router": router_scale * jax.random.normal(ks[4], (D, n_experts))}


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
    p = width_shared_params(n_experts=n_experts)
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
    p = width_shared_params(router_scale=0.1)
    x = inputs(shape=(4, 16, D))
    grads = output_and_balance_grads(ffn.width_shared_ffn, p, x)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0, name
    # the router's gradient through the output alone (not only through the balance loss)
    g_out = jax.jit(jax.grad(lambda prm: jnp.sum(ffn.width_shared_ffn(prm, x, n_experts=E, top_k=K)[0] ** 2)))(p)
    assert float(jnp.abs(g_out["expert_router"]).max()) > 0


def test_width_shared_in_the_model_counts_and_configs():
    """width_shared as a model: its preset, config checks, parameter and FLOP counts, router sharding."""
    from vffn_jax.config import FFN_KINDS, ConfigError, load_config, validate
    from vffn_jax.model import placement
    from vffn_jax.perf import flops

    assert "width_shared" in FFN_KINDS
    cfg = load_config("tiny", "width_shared")
    assert cfg.model.ffn == "width_shared" and cfg.variant == "width_shared"
    with pytest.raises(ConfigError, match=r"model\.n_experts"):
        load_config("tiny", "width_shared", {"model.d_ff": 500})  # f % E != 0
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
    """One train step of width_shared at the shared tiny shape on a (data 2, tensor 2) mesh of 4 devices."""
    from vffn_jax.model import placement
    from vffn_jax.testing.shapes import tiny_config
    from vffn_jax.train import optimizer
    from vffn_jax.train import step as step_lib

    cfg = tiny_config("width_shared", {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2})
    s = placement.setup(cfg, jax.devices()[:4])
    tx = optimizer.make_optimizer(cfg.train)
    _, opt_sh = optimizer.opt_state_shardings(tx, s)
    params, opt_state = optimizer.init_train_state(s, tx, opt_sh)
    step = step_lib.make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_sh)
    batch = np.asarray(jax.random.randint(jax.random.key(0), (cfg.train.batch_size, cfg.train.seq_len + 1), 0, 256),
                       np.int32)
    _, _, metrics = step(params, opt_state, global_batch(batch, s.mesh), 0)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["balance_loss"]) > 0
    assert np.asarray(metrics["expert_load"]).shape == (cfg.model.n_layers, cfg.model.n_experts)
