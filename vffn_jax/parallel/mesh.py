"""The mesh section (`mesh.*`): device mesh axis sizes inside a slice (ICI) and across slices (DCN), and their
resolution against the devices present. Imports nothing of vffn_jax but the error types."""
from __future__ import annotations

import dataclasses
import math

from vffn_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes, inside a slice (ICI) and across slices (DCN).

    Each mesh axis spans `ici * dcn` devices. One ICI size may be -1 (filled with the devices of a
    slice left over) and one DCN size may be -1 (filled with the slices left over). DCN sizes above 1
    build a hybrid mesh (`mesh_utils.create_hybrid_device_mesh`): slices are TPU slices, or processes
    on platforms without slices. Put `data` (or `fsdp`) across slices; `tensor` belongs inside one.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    @property
    def ici(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def dcn(self) -> tuple[int, int, int]:
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)

    def validate(self) -> None:
        """ConfigError for an invalid axis size (the device count is checked by `resolve_mesh_shapes`)."""
        _check_mesh_sizes(self)


_ICI_NAMES = ("mesh.data", "mesh.fsdp", "mesh.tensor")
_DCN_NAMES = ("mesh.dcn_data", "mesh.dcn_fsdp", "mesh.dcn_tensor")


def _check_mesh_sizes(mesh: MeshConfig) -> None:
    for names, sizes in ((_ICI_NAMES, mesh.ici), (_DCN_NAMES, mesh.dcn)):
        if list(sizes).count(-1) > 1:
            raise ConfigError(f"at most one of {names} may be -1 (auto); set the others explicitly")
        for name, size in zip(names, sizes):
            if size == 0 or size < -1:
                raise ConfigError(f"{name}={size}: axis sizes must be positive or -1 (auto)")


def _fill(sizes: tuple[int, ...], names: tuple[str, ...], total: int, what: str) -> tuple[int, ...]:
    sizes = list(sizes)
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % fixed:
            raise ConfigError(f"mesh: {total} {what} are not divisible by the fixed sizes' product {fixed}; "
                              f"change {list(names)}")
        sizes[sizes.index(-1)] = total // fixed
    if math.prod(sizes) != total:
        raise ConfigError(
            f"mesh {dict(zip(names, sizes))} spans {math.prod(sizes)} {what} but there are {total}; "
            "set one axis to -1 or make the product match")
    return tuple(sizes)


def resolve_mesh_shapes(mesh: MeshConfig, n_devices: int, n_slices: int | None = None):
    """(ici_shape, dcn_shape) with the -1 sizes filled in. `n_slices` defaults to the DCN product
    when no DCN size is -1 (one slice when DCN is all 1s)."""
    _check_mesh_sizes(mesh)
    if n_slices is None:
        if -1 in mesh.dcn:
            raise ConfigError("a -1 among mesh.dcn_* needs the number of slices, known only on the devices")
        n_slices = math.prod(mesh.dcn)
    if n_devices % n_slices:
        raise ConfigError(f"mesh: {n_devices} devices do not split into {n_slices} equal slices; "
                          f"change {list(_DCN_NAMES)}")
    dcn = _fill(mesh.dcn, _DCN_NAMES, n_slices, "slices")
    ici = _fill(mesh.ici, _ICI_NAMES, n_devices // n_slices, "devices per slice")
    return ici, dcn


def resolve_mesh_shape(mesh: MeshConfig, n_devices: int, n_slices: int | None = None) -> tuple[int, int, int]:
    """The global (data, fsdp, tensor) sizes: ICI x DCN per axis, checked against the device count."""
    ici, dcn = resolve_mesh_shapes(mesh, n_devices, n_slices)
    return tuple(i * d for i, d in zip(ici, dcn))  # type: ignore[return-value]
