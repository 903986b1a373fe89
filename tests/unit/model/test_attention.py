"""Attention kernels (XLA, splash in Pallas interpret mode) and document masking (model.doc_mask)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vffn_jax.model import attention as attn
from vffn_jax.testing.markers import needs_libtpu
from vffn_jax.parallel import sharding as shd
from vffn_jax.model import placement
from vffn_jax.train import optimizer
from vffn_jax.train import step as step_lib
from vffn_jax.config import ConfigError, MeshConfig, ModelConfig, load_config, validate
from vffn_jax.model.transformer import Attention, Transformer, attention, causal_attend
from vffn_jax.parallel.sharding import global_batch

EOS = 5
SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, n_experts=4, top_k=2, max_depth=3)


def qkv(shape, seed=0):
    return [jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(jax.random.key(seed), 3)]


def packed_tokens(rows, t, vocab=SMALL["vocab_size"], seed=0):
    """[rows, t] random tokens (never EOS) with EOS at a few fixed places: documents of unequal lengths."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab - 1, (rows, t))
    toks[toks >= EOS] += 1  # no accidental EOS
    for r in range(rows):
        for p in rng.choice(np.arange(1, t - 1), size=3, replace=False):
            toks[r, p] = EOS
    toks[0, t - 1] = EOS  # an EOS in the last slot (ends a document, starts none)
    return jnp.asarray(toks, jnp.int32)


def doc_bounds(row):
    """[(start, end)] of each document of a token row: an EOS ends (and belongs to) its document."""
    ends = [i + 1 for i, tok in enumerate(row) if tok == EOS]
    starts = [0] + ends
    return [(s, e) for s, e in zip(starts, ends + [len(row)]) if e > s]


def np_rope(x_tnh, theta):
    """RoPE (rotate-half) with positions 0..t-1, in float64."""
    t, _, h = x_tnh.shape
    inv_freq = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = np.arange(t)[:, None] * inv_freq[None]
    ang = np.concatenate([ang, ang], -1)[:, None, :]
    x1, x2 = np.split(x_tnh, 2, -1)
    return x_tnh * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


def np_causal(q_tnh, k_tnh, v_tnh):
    t, h = q_tnh.shape[0], q_tnh.shape[-1]
    logits = np.einsum("tnh,snh->nts", q_tnh, k_tnh) / np.sqrt(h)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("nts,snh->tnh", w / w.sum(-1, keepdims=True), v_tnh)


# --------------------------------------------------------------------------- segment ids and the XLA path


def test_segment_ids_count_eos_strictly_before():
    toks = jnp.asarray([[1, EOS, 2, 3, EOS, EOS, 4], [EOS, 1, 1, 1, 1, 1, EOS]])
    np.testing.assert_array_equal(attn.segment_ids(toks, EOS), [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])


def test_xla_doc_mask_equals_per_document_reference():
    """Kernel level: each document attended on its own (causal) gives the masked packed result."""
    toks = packed_tokens(3, 40)
    q, k, v = qkv((3, 40, 2, 8))
    got = np.asarray(jax.jit(lambda *a: attn.attend(*a, kind="xla"))(q, k, v, attn.segment_ids(toks, EOS)))
    for b in range(3):
        for s, e in doc_bounds(np.asarray(toks[b])):
            want = np_causal(*(np.asarray(x[b, s:e], np.float64) for x in (q, k, v)))
            np.testing.assert_allclose(got[b, s:e], want, rtol=2e-5, atol=2e-6)


def test_attention_layer_doc_mask_equals_documents_run_separately_with_rope_restarting():
    """Layer level, RoPE included: the packed row (absolute RoPE positions) equals every document run
    alone from position 0 (RoPE scores depend only on q-k offsets, so restarting positions is a no-op)."""
    cfg = ModelConfig(**SMALL, doc_mask=True, eos_id=EOS)
    p = nnx.to_pure_dict(nnx.state(Attention(cfg, nnx.Rngs(0))))
    toks = packed_tokens(2, 48, seed=1)
    x = jax.random.normal(jax.random.key(2), (2, 48, cfg.d_model))
    run = lambda x, s: attention(cfg, p, x, jnp.arange(48), causal_attend(cfg, s))[0]
    got = np.asarray(jax.jit(run)(x, attn.segment_ids(toks, EOS)))
    w = {n: np.asarray(p[n], np.float64) for n in ("w_q", "w_k", "w_v", "w_o")}
    for b in range(2):
        for s, e in doc_bounds(np.asarray(toks[b])):
            xd = np.asarray(x[b, s:e], np.float64)
            q = np_rope(np.einsum("td,dnh->tnh", xd, w["w_q"]), cfg.rope_theta)
            k = np_rope(np.einsum("td,dnh->tnh", xd, w["w_k"]), cfg.rope_theta)
            out = np_causal(q, k, np.einsum("td,dnh->tnh", xd, w["w_v"]))
            np.testing.assert_allclose(got[b, s:e], np.einsum("tnh,nhd->td", out, w["w_o"]), rtol=1e-4, atol=2e-5)


def test_doc_mask_false_keeps_todays_outputs_exactly(monkeypatch):
    cfg = ModelConfig(**SMALL)
    g, st = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    toks = packed_tokens(2, 24)
    run = jax.jit(lambda s, t: nnx.merge(g, s)(t)[0])
    got = np.asarray(run(st, toks))
    # the pre-issue-10 attention call, verbatim
    monkeypatch.setattr(attn, "attend", lambda q, k, v, seg, kind: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(lambda s, t: nnx.merge(g, s)(t)[0])(st, toks)))
    # doc_mask on, but a row without EOS is one document: the same logits
    g2, _ = nnx.split(Transformer(dataclasses.replace(cfg, doc_mask=True, eos_id=EOS), nnx.Rngs(0)))
    no_eos = jnp.where(toks == EOS, EOS + 1, toks)
    np.testing.assert_allclose(jax.jit(lambda s, t: nnx.merge(g2, s)(t)[0])(st, no_eos), run(st, no_eos),
                               rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- documents are isolated in the model


@pytest.mark.parametrize("ffn", ["versatile", "dense"])
def test_a_token_cannot_change_the_next_documents_logits(ffn):
    cfg = ModelConfig(**{**SMALL, "ffn": ffn}, doc_mask=True, eos_id=EOS)
    g, st = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    toks = jnp.asarray(np.random.default_rng(0).integers(EOS + 1, SMALL["vocab_size"], (1, 16)), jnp.int32)
    toks = toks.at[0, 6].set(EOS)  # document 0 = positions 0..6 (EOS included), document 1 = 7..15
    changed = toks.at[0, 3].set(toks[0, 3] % (SMALL["vocab_size"] - 1) + 1)
    run = jax.jit(lambda s, t: nnx.merge(g, s)(t)[0])
    a, b = run(st, toks), run(st, changed)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])  # causality
    assert not np.allclose(a[:, 3:7], b[:, 3:7])  # the rest of its own document sees it
    np.testing.assert_array_equal(a[:, 7:], b[:, 7:])  # the next document does not
    # without doc_mask the next document does see it
    g0, _ = nnx.split(Transformer(dataclasses.replace(cfg, doc_mask=False), nnx.Rngs(0)))
    run0 = jax.jit(lambda s, t: nnx.merge(g0, s)(t)[0])
    assert not np.allclose(run0(st, toks)[:, 7:], run0(st, changed)[:, 7:])


def test_document_isolation_via_gradients():
    """d(logits at position 11, in document 1) / d(input embeddings) is zero outside 7..11 (training mode)."""
    cfg = ModelConfig(**SMALL, doc_mask=True, eos_id=EOS)
    model = Transformer(cfg, nnx.Rngs(0))
    toks = jnp.asarray(np.random.default_rng(1).integers(EOS + 1, SMALL["vocab_size"], (1, 16)), jnp.int32)
    toks = toks.at[0, 6].set(EOS)
    g, st = nnx.split(model)
    seg = attn.segment_ids(toks, EOS)
    x = jnp.take(st["embed"][...], toks, axis=0)

    def out_at_11(x_btd):
        h, _ = nnx.merge(g, st)._run_layers(x_btd, train=True, tau=1.0, rng=jax.random.key(0), segment_ids=seg)
        return h[0, 11].sum()

    per_pos = np.abs(np.asarray(jax.jit(jax.grad(out_at_11))(x))).sum(-1)[0]
    assert np.all(per_pos[:7] == 0) and np.all(per_pos[12:] == 0) and np.all(per_pos[7:12] > 0)


# --------------------------------------------------------------------------- splash (Pallas interpret mode) == XLA


def _splash_vs_xla(q, k, v, seg, splash_fn):
    cot = jax.random.normal(jax.random.key(9), q.shape)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * cot), argnums=(0, 1, 2)))

    (lx, gx), (ls, gs) = loss(lambda *a: attn.attend(*a, kind="xla"))(q, k, v), loss(splash_fn)(q, k, v)
    out_x = attn.attend(q, k, v, seg, kind="xla")
    out_s = jax.jit(splash_fn)(q, k, v, seg)
    np.testing.assert_allclose(out_s, out_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ls, lx, atol=1e-3)  # a sum of ~30k products of O(1) terms
    for a, b in zip(gs, gx):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    return out_s


@pytest.mark.parametrize("doc_mask", [False, True])
def test_splash_interpret_equals_xla_values_and_grads(doc_mask):
    # T=256 in 128-blocks: the causal/segment block skipping of the kernel is exercised
    q, k, v = qkv((2, 256, 2, 32))
    seg = attn.segment_ids(packed_tokens(2, 256), EOS) if doc_mask else None
    _splash_vs_xla(q, k, v, seg, lambda *a: attn.splash_attention(*a, interpret=True, block=128))


@pytest.mark.parametrize("doc_mask,kv_heads", [(False, 4), (True, 2)])  # 2: grouped-query attention
def test_splash_under_shard_map_equals_xla(doc_mask, kv_heads):
    """Batch over (data, fsdp), heads over tensor on 8 fake devices; attend(kind=splash) picks interpret on CPU."""
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
    q, k, v = qkv((4, 128, 4, 16), seed=1)
    k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
    seg = attn.segment_ids(packed_tokens(4, 128, seed=2), EOS) if doc_mask else None
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda *a: attn.attend(*a, kind="splash")).lower(q, k, v, seg).as_text()
        assert "shard_map" in hlo or "sdy.manual_computation" in hlo
        out = _splash_vs_xla(q, k, v, seg, lambda *a: attn.attend(*a, kind="splash"))
    assert out.shape == q.shape


def test_model_with_splash_equals_xla_on_a_mesh_values_and_param_grads():
    """The whole train loss and its parameter gradients, doc_mask on, sharded data 2 x fsdp 2 x tensor 2."""
    over = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.d_ff": 128, "model.ffn": "dense",
            "model.doc_mask": True, "model.eos_id": 256, "train.batch_size": 4, "train.seq_len": 128,
            "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    batch = np.asarray(packed_tokens(4, 129, vocab=384, seed=3)).copy()
    batch[batch == EOS] = 256
    results = []
    for kind in ("xla", "splash"):
        cfg = load_config("tiny", "dense", {**over, "model.attention": kind})
        s = placement.setup(cfg)
        _, params, _ = placement.init_params(cfg.model, s.mesh, 0)
        fn = jax.jit(jax.value_and_grad(
            lambda p, b: step_lib.forward_loss(s.graphdef, p, b, cfg, train=True, tau=1.0, rng=jax.random.key(0))[0]))
        with jax.set_mesh(s.mesh):
            results.append(jax.device_get(fn(params, global_batch(batch, s.mesh))))
    (lx, gx), (ls, gs) = results
    np.testing.assert_allclose(ls, lx, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gx)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- kernel choice and config


def test_auto_kernel_choice_follows_the_platform(capsys):
    assert attn.resolve("auto", jnp.float32, 256, platform_name="cpu") == "xla"
    assert attn.resolve("auto", jnp.bfloat16, 4096, platform_name="tpu") == "splash"
    assert attn.resolve("auto", jnp.bfloat16, 4096, platform_name="gpu") == "cudnn"
    assert attn.resolve("auto", jnp.float32, 4096, platform_name="gpu") == "xla"  # cuDNN has no f32
    assert attn.resolve("splash", jnp.bfloat16, 192, platform_name="tpu") == "xla"  # not a multiple of 128
    assert "not a multiple of 128" in capsys.readouterr().err
    assert attn.resolve("xla", jnp.bfloat16, 4096, platform_name="tpu") == "xla"
    with pytest.raises(ValueError, match="cudnn"):
        attn.resolve("cudnn", jnp.float32, 128, platform_name="gpu")
    # the platform is the mesh's, not the default backend's
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), jax.devices())
    with jax.set_mesh(mesh):
        assert attn.platform() == "cpu"


def test_config_validation():
    def check(**model):
        cfg = load_config("tiny", "versatile", {f"model.{k}": v for k, v in model.items()})
        validate(cfg)

    check(attention="splash", doc_mask=True, eos_id=256)
    with pytest.raises(ConfigError, match="model.eos_id"):
        check(doc_mask=True)
    with pytest.raises(ConfigError, match="byte tokenizer's EOS id is 256"):
        check(doc_mask=True, eos_id=3)
    with pytest.raises(ConfigError, match="choose one of"):
        check(attention="flash")
    with pytest.raises(ConfigError, match="bfloat16"):
        check(attention="cudnn")
    with pytest.raises(ConfigError, match="multiple of 128"):
        validate(load_config("tiny", "versatile", {"model.attention": "splash", "train.seq_len": 100}))


@needs_libtpu
def test_tiny_step_with_splash_and_doc_mask_compiles_for_tpu():
    """The real train step, AOT for v5p:2x2x2 (8 chips, 2 hosts) on this CPU host: Mosaic kernels, not interpret."""
    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.train import preflight

    cfg = load_config("tiny", "versatile", {"model.attention": "splash", "model.doc_mask": True, "model.eos_id": 256,
                                            "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 2})
    s = placement.setup(cfg, preflight.topology_devices("v5p:2x2x2"))
    tx = optimizer.make_optimizer(cfg.train)
    abstract_opt, opt_shardings = optimizer.opt_state_shardings(tx, s)
    step = step_lib.make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=shd.batch_sharding(s.mesh))
    lowered = step.lower(ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings),
                         ckpt.abstract_with_shardings(abstract_opt, opt_shardings), batch,
                         jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(s.mesh)))
    assert "tpu_custom_call" in lowered.as_text()  # the splash kernels (forward, dq, dkv), compiled by Mosaic
    assert lowered.compile().memory_analysis().temp_size_in_bytes > 0
