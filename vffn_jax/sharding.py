"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry logical names (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...); activations are
constrained with the `act_*` names. Changing the parallelism of a run means changing this table
or the mesh shape, never model code.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vffn_jax.config import MeshConfig, resolve_mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),  # ZeRO-3 style: weights sharded over the fsdp axis, gathered per layer
    ("mlp", "tensor"),  # FFN hidden units; E % tensor == 0 keeps each virtual expert on one device
    ("heads", "tensor"),
    ("vocab", "tensor"),  # output projection columns
    ("vocab_in", None),  # input embedding rows: a gather over a vocab-sharded table makes XLA replicate it
    ("layers", None),  # the scanned layer axis
    ("head_dim", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation, not JAX's Explicit default)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


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
