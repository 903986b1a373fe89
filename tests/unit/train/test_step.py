"""Gradient accumulation (`train.grad_accum`): N microbatches in one step equal the one-batch step.

What is exact (up to f32 rounding): losses, every parameter after several steps, the logged routing
statistics and each token's Gumbel noise, for dense, moe and versatile, on one device and on a
(2, 2, 2) mesh, with `train.grad_accum_exact_balance=true`. With the default (`false`) the Switch
balance loss's *gradient* uses each microbatch's own expert load: the logged statistics are still the
whole batch's, the gradient differs by a measured amount (`test_accumulated_gradient_equals_one_batch_gradient`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vffn_jax.model import ffn
from vffn_jax.parallel import sharding as shd
from vffn_jax.model import placement
from vffn_jax.train import optimizer
from vffn_jax.train import step as step_lib
from vffn_jax.config import ConfigError, validate
from vffn_jax.testing.shapes import tiny_config
from vffn_jax.evals import step as eval_step_lib
from vffn_jax.parallel.sharding import global_batch
from vffn_jax.parallel import microbatch

# The shared tiny shape (batch 8 x 32 tokens, 2 layers, d 64, f 128, train.steps 4): with grad_accum 1 the steps
# below are the programs tests/unit/train/test_loop.py trains with on one device and on the (2, 2, 2) mesh.
STEPS = 3
ONE = {"mesh.data": 1}
MESH222 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
# Parameters after 3 AdamW steps at lr 3e-3. Gradients agree to f32 rounding (~1e-6 relative, tested directly
# below), and almost every parameter to ~1e-6; but Adam divides each gradient component by its own RMS, so in
# the first steps a component whose gradient is a near-cancellation (an embedding row seen once) turns that
# rounding into an update difference of a sizeable fraction of lr (measured up to 1e-4). Hence two bounds:
PARAM_ATOL = 3e-4  # every parameter (a tenth of lr; the default balance mode's difference is ~2e-3)
PARAM_TIGHT, TIGHT_SHARE = 1e-5, 1e-3  # ... and all but 0.1% of them within 1e-5


def cfg_for(variant, n, mesh=ONE, **over):
    return tiny_config(variant, {**mesh, "train.grad_accum": n, **over})


def batches(cfg):
    rng = np.random.default_rng(0)
    return [rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
            for _ in range(STEPS)]


@functools.lru_cache(maxsize=None)
def run(variant, n, mesh_items=tuple(ONE.items()), exact=True, eval_too=False):
    """(per-step metrics, final params, eval output, compiled step) of STEPS steps from the same init and
    batches (each program compiled once per test session: compiling dominates this file's time)."""
    mesh = dict(mesh_items)
    # the balance mode matters only with microbatches: one batch keeps the default (the training loop's program)
    cfg = cfg_for(variant, n, mesh, **({"train.grad_accum_exact_balance": exact} if n > 1 else {}))
    devices = jax.devices()[:1] if mesh == ONE else jax.devices()
    s = placement.setup(cfg, devices)
    tx = optimizer.make_optimizer(cfg.train)
    _, opt_sh = optimizer.opt_state_shardings(tx, s)
    params, opt_state = optimizer.init_train_state(s, tx, opt_sh)
    step = step_lib.make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_sh)
    data = [global_batch(b, s.mesh) for b in batches(cfg)]
    counters = [jax.device_put(jnp.asarray(i, jnp.int32), shd.replicated(s.mesh)) for i in range(STEPS)]
    compiled = step.lower(params, opt_state, data[0], counters[0]).compile()
    metrics = []
    for b, i in zip(data, counters):
        params, opt_state, m = compiled(params, opt_state, b, i)
        metrics.append(jax.device_get(m))
    ev = None
    if eval_too:
        eval_step = eval_step_lib.make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)
        ev = jax.device_get(eval_step(params, data[0]))
    return metrics, jax.device_get(params), ev, compiled


def assert_metrics_equal(a, b, skip=()):
    assert set(a) == set(b)
    for k in a:
        if k not in skip:
            np.testing.assert_allclose(np.asarray(b[k], np.float64), np.asarray(a[k], np.float64),
                                       rtol=2e-5, atol=2e-6, err_msg=k)


def assert_params_equal(a, b):
    loose, n = 0, 0
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=PARAM_ATOL, err_msg=shd.param_name(path))
        loose += int(np.sum(np.abs(np.asarray(y) - np.asarray(x)) > PARAM_TIGHT))
        n += np.size(x)
    assert loose <= TIGHT_SHARE * n, f"{loose} of {n} parameters differ by more than {PARAM_TIGHT}"


# ---------------------------------------------------------------- the noise and the split


def test_gumbel_noise_of_a_microbatch_is_the_whole_batch_noise_of_its_rows():
    key = jax.random.key(5)
    noise = jax.jit(ffn.gumbel_noise, static_argnums=1)
    whole = noise(key, (8, 32, 4), None)
    for n in (2, 8):
        for j in range(n):
            rows = microbatch.microbatch_row_ids(j, n, 8 // n)
            np.testing.assert_array_equal(noise(key, (8 // n, 32, 4), rows), whole[np.asarray(rows)])
    # and the straight-through sample built from it
    logits = jax.random.normal(jax.random.key(1), (8, 32, 4))
    g = ffn.straight_through_gumbel(logits, 0.7, key)
    rows = microbatch.microbatch_row_ids(1, 2, 4)
    np.testing.assert_array_equal(ffn.straight_through_gumbel(logits[np.asarray(rows)], 0.7, key, rows),
                                  g[np.asarray(rows)])


def test_split_keeps_rows_and_the_model_samples_the_same_depths():
    cfg = cfg_for("versatile", 1)
    batch = jnp.asarray(batches(cfg)[0])
    micro = microbatch.split_microbatches(batch, 4)
    assert micro.shape == (4, 2, cfg.train.seq_len + 1)
    for j in range(4):
        np.testing.assert_array_equal(micro[j], batch[np.asarray(microbatch.microbatch_row_ids(j, 4, 2))])
    # through the layer stack: a microbatch's sampled depths (every layer) are the whole batch's
    graphdef, params = placement.abstract_model(cfg.model)[0], placement.init_params(cfg.model, placement.setup(
        cfg, jax.devices()[:1]).mesh)[1]
    key = jax.random.key(9)

    @jax.jit
    def depths(tokens, row_ids):
        return step_lib.forward_loss(graphdef, params, tokens, cfg, train=True, tau=1.0, rng=key,
                                      row_ids=row_ids)[1][1]["depth"]

    whole = depths(batch, None)
    rows = microbatch.microbatch_row_ids(3, 4, 2)
    part = depths(micro[3], rows)
    assert len(np.unique(whole)) > 1
    np.testing.assert_array_equal(part, whole[:, np.asarray(rows)])


# ---------------------------------------------------------------- the gradient


@functools.lru_cache(maxsize=None)
def first_gradient(n, exact=True):
    cfg = cfg_for("versatile", n, **{"train.grad_accum_exact_balance": exact})
    s = placement.setup(cfg, jax.devices()[:1])
    params = placement.init_params(cfg.model, s.mesh, 0)[1]
    step = jax.jit(lambda p, b: step_lib.accumulate_gradients(s.graphdef, p, b, cfg, tau=1.0, rng=jax.random.key(3)))
    return jax.device_get(step(params, batches(cfg)[0]))


def leaf_rel_diffs(a, b):
    """Largest |difference| per parameter, relative to that parameter's largest gradient entry."""
    return {shd.param_name(p): float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(x))))
            for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b))}


@pytest.mark.slow  # three gradient programs of their own: ~30 s cold (the default tier checks the steps below)
def test_accumulated_gradient_equals_one_batch_gradient():
    (g1, s1), (g4, s4) = first_gradient(1), first_gradient(4)
    worst = leaf_rel_diffs(g1, g4)
    assert max(worst.values()) < 1e-5, worst  # measured <= 8e-7: f32 rounding
    assert_metrics_equal(s1, s4)
    # default mode: the balance gradient from each microbatch's own load. Measured (this shape, N=4): relative
    # to the expert router's gradient 1.8e-3 at balance_coef 1e-5 (2.4 at 1e-1); the whole gradient's norm
    # 2.6e-7 (5.4e-4 at 1e-1), against ~2.3e-7 of f32 rounding in the exact mode.
    g_local, s_local = first_gradient(4, exact=False)
    local = leaf_rel_diffs(g1, g_local)
    assert 1e-5 < local["layers/ffn/expert_router"] < 1e-2, local
    assert_metrics_equal(s1, s_local)  # the logged statistics are the whole batch's in both modes


# ---------------------------------------------------------------- the step


def test_versatile_accumulated_equals_one_batch():
    """grad_accum 4 here; 2 on the (2, 2, 2) mesh below."""
    base, base_params, base_eval, _ = run("versatile", 1, eval_too=True)
    acc, acc_params, acc_eval, _ = run("versatile", 4, eval_too=True)
    assert {"loss", "total_loss", "grad_norm", "tau", "lr", "mean_depth", "mean_alpha", "depth_hist",
            "depth_entropy", "expert_load", "router_entropy", "balance_loss", "z_loss"} == set(base[0])
    for a, b in zip(base, acc):  # losses, grad norm, depth mean/histogram, expert load, entropy, balance loss
        assert_metrics_equal(a, b)
    assert_params_equal(base_params, acc_params)
    # the eval step splits the batch the same way; only the loops it executed differ (compacted per microbatch)
    assert_metrics_equal(base_eval, acc_eval, skip=("executed_depth",))


@pytest.mark.slow  # four more step programs: ~45 s cold (versatile, which has both routers, is in the default tier)
@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_baselines_accumulated_equal_one_batch(variant):
    base, base_params, _, _ = run(variant, 1)
    acc, acc_params, _, _ = run(variant, 4)
    for a, b in zip(base, acc):
        assert_metrics_equal(a, b)
    assert_params_equal(base_params, acc_params)


def test_sharded_mesh_accumulated_equals_one_batch():
    """(data 2, fsdp 2, tensor 2): 4 data-parallel rows per microbatch of 4 rows."""
    mesh = tuple(MESH222.items())
    base, base_params, _, _ = run("versatile", 1, mesh)
    acc, acc_params, _, _ = run("versatile", 2, mesh)
    for a, b in zip(base, acc):
        assert_metrics_equal(a, b)
    assert_params_equal(base_params, acc_params)
    single = run("versatile", 1)[0]
    np.testing.assert_allclose([m["loss"] for m in acc], [m["loss"] for m in single], rtol=2e-4)


def test_microbatch_split_moves_no_batch_data_between_devices():
    """The strided split keeps each device's rows: no collective of the int32 batch, less temp memory."""
    import re
    mesh = tuple(MESH222.items())
    c = run("versatile", 2, mesh)[3]
    collectives = re.findall(r"= (.*?) (?:all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                             r"(?:-start)?\(", c.as_text())
    assert collectives  # the mesh is really sharded
    assert not [t for t in collectives if "s32" in t or "u32" in t], "the batch split introduced a collective"
    assert c.memory_analysis().temp_size_in_bytes < run("versatile", 1, mesh)[3].memory_analysis().temp_size_in_bytes


def test_batch_must_split_over_microbatches_and_devices():
    with pytest.raises(ConfigError, match="train.grad_accum=3"):
        cfg_for("versatile", 3)
    with pytest.raises(ConfigError, match="train.grad_accum=0"):
        cfg_for("versatile", 0)
    cfg = cfg_for("versatile", 4, MESH222)  # 8 rows: 4 microbatches x 4 data-parallel devices do not fit
    with pytest.raises(ConfigError, match=r"train.batch_size=8 is not divisible by train.grad_accum=4 .*mesh.data\*mesh.fsdp=4"):
        validate(cfg, n_devices=8)
    validate(cfg_for("versatile", 2, MESH222), n_devices=8)
