"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry logical names (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...); activations are
constrained with the `act_*` names. Changing the parallelism of a run means changing this table
or the mesh shape, never model code.
"""
from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vffn_jax.config import ConfigError, MeshConfig, resolve_mesh_shapes

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),  # ZeRO-3 style: weights sharded over the fsdp axis, gathered per layer
    ("mlp", "tensor"),  # FFN hidden units; E % tensor == 0 keeps each virtual expert on one device
    ("expert", None),  # moe's stacked real experts [E, d, f/E]: every device holds all E, each split like the dense FFN
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query attention: key/value heads split like the query heads (K % tensor == 0)
    ("vocab", "tensor"),  # output projection columns
    ("vocab_in", "tensor"),  # input embedding rows at rest; the model gathers the table whole before the lookup
    ("layers", None),  # the scanned layer axis
    ("head_dim", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def slice_granule(devices) -> str:
    """What a DCN "slice" is: a TPU slice (`slice_index`) on TPUs, a process elsewhere (GPU hosts, CPU tests)."""
    tpu = all(getattr(d, "platform", "") == "tpu" and hasattr(d, "slice_index") for d in devices)
    return "slice_index" if tpu else "process_index"


def count_slices(devices) -> int:
    attr = slice_granule(devices)
    return len({getattr(d, attr) for d in devices})


def mesh_slices(cfg: MeshConfig, devices) -> int:
    """How many DCN granules the mesh spans: 1 unless some mesh.dcn_* size is above 1 or -1."""
    return count_slices(devices) if -1 in cfg.dcn or math.prod(cfg.dcn) > 1 else 1


def device_grid(cfg: MeshConfig, devices) -> np.ndarray:
    """Devices arranged (data, fsdp, tensor). With all DCN sizes 1 the arrangement is topology-aware
    within a slice (`create_device_mesh`); otherwise it is hybrid: each DCN block is one slice (or
    process), so only the axes with DCN sizes above 1 cross the slow network."""
    devices = list(devices)
    ici, dcn = resolve_mesh_shapes(cfg, len(devices), mesh_slices(cfg, devices))
    if math.prod(dcn) > 1:
        try:
            return mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, process_is_granule=slice_granule(devices) == "process_index")
        except ValueError as e:
            raise ConfigError(f"mesh.dcn_*={dcn} with mesh ici sizes {ici}: {e}") from None
    try:
        return mesh_utils.create_device_mesh(ici, devices)
    except (ValueError, NotImplementedError, AssertionError):  # a device set the topology helper rejects
        return np.asarray(devices).reshape(ici)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh for `cfg` over `devices` (default: all).

    Axis types are Auto on purpose: the model is written GSPMD-style (parameters and activations
    carry logical shardings, XLA propagates the rest). JAX's default, Explicit, would make every
    sharded matmul a type error.
    """
    grid = device_grid(cfg, devices if devices is not None else jax.devices())
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names) -> P:
    table = dict(LOGICAL_RULES)
    return P(*(table.get(n) if n is not None else None for n in names))


def axis_rules():
    """Context manager installing LOGICAL_RULES for flax's logical-name resolution."""
    return nnx.logical_axis_rules(LOGICAL_RULES)


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an (abstract) nnx.State from each Variable's logical `sharding_names`."""
    with axis_rules():
        return nnx.get_named_sharding(abstract_state, mesh)


def constrain(x, *names):
    """`with_sharding_constraint` by logical names; a no-op outside a mesh context (e.g. unit tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("act_batch", None)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class on_mesh:
    """A jitted function that is traced, lowered and called under `jax.set_mesh(mesh)`, so the
    logical activation constraints (`constrain`) see the mesh. Supports `.lower(...)` for AOT use."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.trace(*args, **kwargs)


def param_name(path) -> str:
    """`layers/ffn/w_gate` for a state leaf's key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")


def sharding_report(abstract_params, shardings) -> dict:
    """How well parameters spread over the mesh: per parameter its spec, shard count and bytes per
    device; overall the fraction of parameter bytes that every device holds whole (`replicated`) and
    the fraction held redundantly beyond a perfect 1/N split (`redundant`, counts partial replication).
    Raises ConfigError for a dimension its mesh axes do not divide."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    params, total, replicated, redundant, per_device = {}, 0, 0, 0.0, 0.0
    for (path, sh), leaf in zip(flat, jax.tree.leaves(abstract_params)):
        name, shape = param_name(path), tuple(leaf.shape)
        mesh_sizes = dict(sh.mesh.shape)
        n_devices = math.prod(mesh_sizes.values())
        shards = 1
        for dim, entry in zip(shape, tuple(sh.spec) + (None,) * (len(shape) - len(sh.spec))):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            size = math.prod(mesh_sizes[a] for a in axes)
            if dim % size:
                raise ConfigError(f"parameter {name} {shape}: dimension {dim} is not divisible by mesh axes "
                                  f"{axes} of size {size}; change the mesh or the model shape")
            shards *= size
        nbytes = math.prod(shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        replicated += nbytes if shards == 1 and n_devices > 1 else 0
        redundant += nbytes * (1 - shards / n_devices)
        per_device += nbytes / shards
        params[name] = {"shape": list(shape), "spec": str(sh.spec), "shards": shards,
                        "bytes_per_device": nbytes // shards}
    return {"params": params, "total_bytes": total, "bytes_per_device": int(per_device),
            "replicated_fraction": replicated / max(total, 1), "redundant_fraction": redundant / max(total, 1)}


def global_batch(local_batch, mesh) -> jax.Array:
    """Assembles the global batch (sharded over the batch axes) from each process's rows."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)
