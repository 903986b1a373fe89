"""The decoder around the FFN: layer scan, remat, causality, variant equivalences, parameter counts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vffn_jax.model import placement
from vffn_jax.config import ModelConfig, load_config
from vffn_jax.model.transformer import Transformer
from vffn_jax.evals import step as eval_step_lib
from vffn_jax.parallel.sharding import global_batch

SMALL = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=64, n_experts=4, top_k=2, max_depth=3)


def small(ffn="versatile", **kw):
    return ModelConfig(**{**SMALL, "ffn": ffn, **kw})


def tokens(shape=(2, 12), seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, SMALL["vocab_size"])


def build(cfg, seed=0):
    return nnx.split(Transformer(cfg, nnx.Rngs(seed)))


def apply(graphdef, state, toks, **kw):
    return jax.jit(lambda st, t: nnx.merge(graphdef, st)(t, **kw))(state, toks)


@pytest.mark.parametrize("train", [False, True])
def test_scanned_layers_equal_unrolled(train):
    cfg = small()
    g, st = build(cfg)
    g2, _ = build(dataclasses.replace(cfg, scan_layers=False))
    kw = dict(train=train, tau=1.0, rng=jax.random.key(3)) if train else {}
    (a, aux_a), (b, aux_b) = apply(g, st, tokens(), **kw), apply(g2, st, tokens(), **kw)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(aux_a["depth"], aux_b["depth"])


def test_scan_compiles_one_layer_body():
    cfg = small(n_layers=6)
    g, st = build(cfg)
    hlo = jax.jit(lambda s, t: nnx.merge(g, s)(t)[0]).lower(st, tokens()).as_text()
    # one layer body inside a loop: the number of attention dot_generals does not scale with n_layers
    g2, st2 = build(dataclasses.replace(cfg, n_layers=2))
    hlo2 = jax.jit(lambda s, t: nnx.merge(g2, s)(t)[0]).lower(st2, tokens()).as_text()
    assert hlo.count("dot_general") == hlo2.count("dot_general")


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_equals_no_remat(policy):
    cfg = small()
    g, st = build(cfg)
    g2, _ = build(dataclasses.replace(cfg, remat=policy, remat_loops=True))
    toks = tokens()

    def loss(graphdef):
        def f(state):
            logits, _ = nnx.merge(graphdef, state)(toks, train=True, tau=1.0, rng=jax.random.key(1))
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return jax.jit(jax.value_and_grad(f))

    (l1, g1), (l2, g2_) = loss(g)(st), loss(g2)(st)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2_)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ffn", ["versatile", "dense", "depth_only"])
def test_causality(ffn):
    """Changing token t changes no logit before t (also with the batch-wide while_loop at inference)."""
    g, st = build(small(ffn))
    toks = tokens((1, 12))
    t = 7
    changed = toks.at[0, t].set((toks[0, t] + 5) % SMALL["vocab_size"])
    a, _ = apply(g, st, toks)
    b, _ = apply(g, st, changed)
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, t:], b[:, t:])


def test_causality_via_gradients():
    """d(hidden at position 4) / d(input embeddings) is zero for every later position (training mode)."""
    g, st = build(small())
    x = jnp.take(st["embed"][...], tokens((1, 10)), axis=0)

    def out_at_4(x_btd):
        h, _ = nnx.merge(g, st)._run_layers(x_btd, train=True, tau=1.0, rng=jax.random.key(0))
        return h[0, 4].sum()

    per_pos = np.abs(np.asarray(jax.jit(jax.grad(out_at_4))(x))).sum(-1)[0]
    assert np.all(per_pos[5:] == 0) and np.all(per_pos[:5] > 0)


def test_kloop_one_and_width_only_single_expert_equal_dense():
    g, st = build(small("dense"))
    want, _ = apply(g, st, tokens())
    gk, _ = build(small("kloop", n_loops=1))
    np.testing.assert_allclose(apply(gk, st, tokens())[0], want, rtol=1e-6, atol=1e-6)
    width = Transformer(small("width_only", n_experts=1, top_k=1), nnx.Rngs(1))
    nnx.update(width, st)  # shared weights from the dense model; the router is the only other param
    np.testing.assert_allclose(apply(*nnx.split(width), tokens())[0], want, rtol=1e-5, atol=1e-5)


def test_moe_354m_parameter_count():
    """The paper's MoE baseline: dense + E experts of f/E units (3*d*f per layer) + the router d*E per layer."""
    info = placement.describe(placement.setup(load_config("354m", "moe")))
    assert info["params_total"] == 543_579_136 == info["params_analytic"]
    assert info["params_total"] == 354_712_576 + 15 * (8 * 3 * 1024 * 512 + 1024 * 8)
    gate = info["shardings"]["layers/ffn/expert_w_gate"]
    assert (gate["shape"], gate["spec"]) == ([15, 8, 1024, 512], "P(None, None, 'fsdp', 'tensor')")
    assert info["shardings"]["layers/ffn/expert_w_down"]["spec"] == "P(None, None, 'tensor', 'fsdp')"
    dense = placement.describe(placement.setup(load_config("354m", "dense")))
    m = load_config("354m", "moe").model
    ffn_dense = 6 * m.d_model * m.d_ff
    extra = info["flops_per_token_inference"] - dense["flops_per_token_inference"]
    assert extra == m.n_layers * (ffn_dense * m.top_k / m.n_experts + 2 * m.d_model * m.n_experts)  # 1.25x + router
    avg = placement.describe(placement.setup(load_config("354m", "versatile_avg")))
    vers = placement.describe(placement.setup(load_config("354m", "versatile")))
    for key in ("params_total", "params_analytic", "flops_per_token_train", "flops_per_token_inference"):
        assert avg[key] == vers[key]


@pytest.mark.parametrize("scale,expected", [("354m", 354_712_576), ("720m", 720_812_544), ("1.2b", 1_212_741_632)])
def test_paper_parameter_counts(scale, expected):
    dense = placement.describe(placement.setup(load_config(scale, "dense")))
    assert dense["params_total"] == expected == dense["params_analytic"]
    vers = placement.describe(placement.setup(load_config(scale, "versatile")))
    m = load_config(scale, "versatile").model
    assert vers["params_total"] - expected == m.n_layers * m.d_model * (m.n_experts + m.max_depth)


# moe: stacked experts sharded [E, d/fsdp, (f/E)/tensor]; with grouped-query attention (2 key/value heads over
# tensor=2) and a tied head (the embedding serves as the vocab-sharded output projection)
@pytest.mark.parametrize("variant,extra", [("versatile", {}),
                                           ("moe", {"model.n_kv_heads": 2, "model.tie_embeddings": True})])
def test_sharded_forward_equals_single_device(variant, extra):
    cfg = load_config("tiny", variant, {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4,
                                            "model.d_ff": 128, "train.batch_size": 8, "train.seq_len": 16,
                                            "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, **extra})
    outs = []
    for devices, mesh_over in ((jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1}), (jax.devices(), None)):
        c = cfg if mesh_over is None else dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **mesh_over))
        s = placement.setup(c, devices)
        _, params, _ = placement.init_params(c.model, s.mesh, 0)
        step = eval_step_lib.make_eval_step(s.graphdef, c, s.mesh, s.param_shardings)
        batch = np.asarray(jax.random.randint(jax.random.key(0), (8, 17), 0, 257))
        outs.append(jax.device_get(step(params, global_batch(batch, s.mesh))))
        if mesh_over is None:
            assert len(params["embed" if c.model.tie_embeddings else "lm_head"][...].sharding.device_set) == 8
    np.testing.assert_allclose(outs[0]["ce_sum"], outs[1]["ce_sum"], rtol=1e-5)
    np.testing.assert_allclose(outs[0]["expert_load"], outs[1]["expert_load"])
    if variant == "versatile":
        np.testing.assert_allclose(outs[0]["depth_hist"], outs[1]["depth_hist"])


def test_grouped_query_attention_equals_repeated_key_value_heads():
    """K key/value heads serving N/K query heads each equal multi-head attention whose k/v weights repeat each
    key/value head N/K times in a row (transformers' Llama grouping)."""
    gqa = small("versatile", n_kv_heads=2)
    g, st = build(gqa)
    params = nnx.to_pure_dict(st)
    assert params["layers"]["attn"]["w_k"].shape == (3, 32, 2, 8)
    mha = jax.tree.map(lambda a: a, params)
    for name in ("w_k", "w_v"):
        mha["layers"]["attn"][name] = jnp.repeat(params["layers"]["attn"][name], 2, axis=2)
    g_mha, st_mha = build(small("versatile"))
    nnx.replace_by_pure_dict(st_mha, mha)
    want, aux_want = apply(g_mha, st_mha, tokens())
    got, aux_got = apply(g, st, tokens())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(aux_got["depth"], aux_want["depth"])


def test_tied_head_is_the_embedding_transposed():
    tied = small("dense", tie_embeddings=True)
    g, st = build(tied)
    params = nnx.to_pure_dict(st)
    assert "lm_head" not in params
    g_u, st_u = build(small("dense"))
    untied = {**params, "lm_head": params["embed"].T}
    nnx.replace_by_pure_dict(st_u, untied)
    np.testing.assert_allclose(apply(g, st, tokens())[0], apply(g_u, st_u, tokens())[0], rtol=1e-6, atol=1e-6)
    assert placement.describe(placement.setup(load_config("tiny", "dense", {"model.tie_embeddings": True,
                                                                          "model.n_kv_heads": 1})))["params_total"] \
        == placement.describe(placement.setup(load_config("tiny", "dense", {"model.tie_embeddings": True,
                                                                          "model.n_kv_heads": 1})))["params_analytic"]


def test_bf16_compute_with_f32_params():
    g, st = build(small("dense"))
    g16, _ = build(small("dense", dtype="bfloat16"))
    want, _ = apply(g, st, tokens())
    got, _ = apply(g16, st, tokens())
    assert got.dtype == jnp.float32  # the output projection accumulates in f32
    np.testing.assert_allclose(got, want, atol=0.05)
    gv, stv = build(small("versatile", dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(stv)} == {jnp.dtype(jnp.float32)}
    logits, aux = apply(gv, stv, tokens(), train=True, tau=1.0, rng=jax.random.key(0))
    assert np.all(np.isfinite(logits)) and aux["depth"].min() >= 1
