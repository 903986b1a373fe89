"""Mesh construction (ICI x DCN, Auto axis types), sharding quality at the paper's scales, virtual
experts aligned with tensor shards, and checkpoints restored onto other meshes and device counts."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.parallel import sharding as shd
from vffn_jax.model import placement
from vffn_jax.train import optimizer
from vffn_jax.train import step as step_lib
from vffn_jax.config import ConfigError, MeshConfig, load_config, resolve_mesh_shapes
from vffn_jax.testing.shapes import tiny_config
from vffn_jax.evals import step as eval_step_lib
from vffn_jax.parallel.sharding import global_batch

MESH_AXES = shd.MESH_AXES


# --------------------------------------------------------------------------- mesh


def test_mesh_sizes_resolve_ici_and_dcn():
    assert resolve_mesh_shapes(MeshConfig(), 8) == ((8, 1, 1), (1, 1, 1))
    assert resolve_mesh_shapes(MeshConfig(data=1, fsdp=-1, tensor=2), 8) == ((1, 4, 2), (1, 1, 1))
    # 4 slices of 16 chips: data across slices, fsdp x tensor inside one
    cfg = MeshConfig(data=1, fsdp=-1, tensor=4, dcn_data=-1)
    assert resolve_mesh_shapes(cfg, 64, n_slices=4) == ((1, 4, 4), (4, 1, 1))
    with pytest.raises(ConfigError, match="mesh.tensor"):
        resolve_mesh_shapes(MeshConfig(data=-1, fsdp=1, tensor=3), 8)
    with pytest.raises(ConfigError, match="at most one of"):
        resolve_mesh_shapes(MeshConfig(dcn_data=-1, dcn_fsdp=-1), 8, n_slices=2)


def test_mesh_axis_types_are_auto_and_shape_follows_config():
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    one = shd.make_mesh(MeshConfig(), jax.devices()[:1])
    assert one.devices.size == 1


def test_hybrid_mesh_puts_each_slice_in_its_own_dcn_block():
    # Stand-in devices of 2 processes x 4 (the attributes mesh_utils reads)
    devices = [types.SimpleNamespace(id=i, slice_index=0, process_index=i // 4, platform="cpu",
                                     device_kind="cpu", coords=None, core_on_chip=0) for i in range(8)]
    cfg = MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2)
    ici, dcn = resolve_mesh_shapes(cfg, 8, shd.count_slices(devices))
    grid = shd.device_grid(cfg, devices)
    assert (ici, dcn) == ((1, 2, 2), (2, 1, 1)) and grid.shape == (2, 2, 2)
    for block in range(2):  # off TPU a process is a slice: only the data axis crosses processes
        assert {d.process_index for d in grid[block].flat} == {block}


def test_dcn_sizes_need_that_many_slices():
    with pytest.raises(ConfigError, match="mesh.dcn_"):
        shd.make_mesh(MeshConfig(data=-1, dcn_data=2))  # 8 local devices are one process, one slice


# --------------------------------------------------------------------------- sharding quality


@pytest.mark.parametrize("scale", ["354m", "720m", "1.2b"])
@pytest.mark.parametrize("variant", ["versatile", "dense", "kloop", "width_only", "depth_only", "versatile_avg", "moe"])
def test_parameters_are_spread_over_fsdp_x_tensor(scale, variant):
    cfg = load_config(scale, variant)
    _, abstract = placement.abstract_model(cfg.model)
    for fsdp, tensor in [(16, 4), (64, 1), (32, 8)]:
        mesh = jax.sharding.AbstractMesh((1, fsdp, tensor), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
        report = shd.sharding_report(abstract, shd.state_shardings(abstract, mesh))
        assert report["replicated_fraction"] <= 0.02, (fsdp, tensor, report["replicated_fraction"])
        # stricter: bytes held by more devices than a perfect 1/N split (partial replication counts)
        assert report["redundant_fraction"] <= 0.02, (fsdp, tensor, report["redundant_fraction"])
        assert report["bytes_per_device"] <= 1.02 * report["total_bytes"] / (fsdp * tensor)


@pytest.mark.parametrize("n_experts,tensor", [(8, 2), (8, 8), (4, 4)])
def test_virtual_experts_live_whole_on_one_tensor_shard(n_experts, tensor):
    cfg = load_config("tiny", "versatile", {"model.n_experts": n_experts, "model.n_heads": 8,
                                            "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": tensor})
    s = placement.setup(cfg)
    f, width = cfg.model.d_ff, cfg.model.d_ff // n_experts
    ffn = s.param_shardings["layers"]["ffn"]
    for name, axis in (("w_gate", 2), ("w_up", 2), ("w_down", 1)):
        sharding = ffn[name].get_value()
        shape = s.abstract_params["layers"]["ffn"][name].shape
        blocks = {(idx[axis].start or 0, idx[axis].stop or f) for idx in sharding.devices_indices_map(shape).values()}
        assert len(blocks) == tensor
        for e in range(n_experts):  # expert e's units [e*w, (e+1)*w) sit inside exactly one device block
            assert sum(lo <= e * width and (e + 1) * width <= hi for lo, hi in blocks) == 1, (name, e, blocks)


def test_experts_misaligned_with_tensor_are_refused():
    cfg = load_config("tiny", "versatile", {"model.n_experts": 4, "model.n_heads": 8,
                                            "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8})
    with pytest.raises(ConfigError, match=r"model\.n_experts=4 is not divisible by the tensor-parallel size 8"):
        placement.setup(cfg)


def test_dry_run_reports_every_parameter_sharding():
    info = placement.describe(placement.setup(load_config("tiny", "versatile", {"mesh.data": 1, "mesh.fsdp": 4,
                                                                               "mesh.tensor": 2})))
    assert info["shardings"]["layers/ffn/w_gate"]["spec"] == "P(None, 'fsdp', 'tensor')"
    assert info["shardings"]["embed"]["shards"] == 8
    assert info["replicated_param_fraction"] == 0.0


# --------------------------------------------------------------------------- restore onto another mesh


def test_checkpoint_restores_onto_other_meshes_and_device_counts(tmp_path):
    """A checkpoint saved on the 8-device data mesh after one train step (the shared tiny shape: the same
    programs as every tiny run's) restores onto (data 2, fsdp 2, tensor 2) and onto 1 device: the same params
    and optimizer state, laid out on the new mesh, and the same forward (the eval step's loss) as on the
    source mesh."""
    cfg = tiny_config("versatile")
    src = placement.setup(cfg)
    assert dict(src.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    tx = optimizer.make_optimizer(cfg.train)
    _, opt_sh = optimizer.opt_state_shardings(tx, src)
    params, opt_state = optimizer.init_train_state(src, tx, opt_sh)
    batch = np.random.default_rng(0).integers(0, 256, (cfg.train.batch_size, cfg.train.seq_len + 1), dtype=np.int32)
    step = step_lib.make_train_step(src.graphdef, tx, cfg, src.mesh, src.param_shardings, opt_sh)
    params, opt_state, _ = step(params, opt_state, global_batch(batch, src.mesh), jnp.asarray(0))
    manager = ckpt.make_manager(tmp_path, cfg.run)
    ckpt.save(manager, 1, params, opt_state, force=True)
    manager.wait_until_finished()
    want_params, want_opt = jax.device_get((params, opt_state))
    want = eval_step_lib.make_eval_step(src.graphdef, cfg, src.mesh, src.param_shardings)(
        params, global_batch(batch, src.mesh))

    # the tiny shape's 2 heads split over tensor 2
    for mesh_overrides, devices in (({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, jax.devices()),
                                    ({"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}, jax.devices()[:1])):
        cfg2 = tiny_config("versatile", mesh_overrides)
        dst = placement.setup(cfg2, devices)
        _, opt_sh2 = optimizer.opt_state_shardings(tx, dst)
        abstract_opt = jax.eval_shape(tx.init, dst.abstract_params)
        got_params, got_opt = ckpt.restore(
            ckpt.make_manager(tmp_path, read_only=True), 1,
            ckpt.abstract_with_shardings(dst.abstract_params, dst.param_shardings),
            ckpt.abstract_with_shardings(abstract_opt, opt_sh2))
        for leaf in jax.tree.leaves((got_params, got_opt)):
            assert leaf.sharding.mesh == dst.mesh and leaf.sharding.mesh.devices.size == len(devices)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got_params), want_params)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got_opt), want_opt)
        got = eval_step_lib.make_eval_step(dst.graphdef, cfg2, dst.mesh, dst.param_shardings)(
            got_params, global_batch(batch, dst.mesh))
        np.testing.assert_allclose(float(got["ce_sum"]), float(want["ce_sum"]), rtol=2e-5)
