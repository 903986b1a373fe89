"""Keep ordinary CPU commands quiet when the optional TPU extra (libtpu) is installed on a host without TPUs.

Why: with JAX_PLATFORMS unset, JAX initialises every backend it knows, and its TPU backend is always
registered; when the `libtpu` package is importable (requirements-tpu.txt, installed for the TPU
pre-flight) JAX loads libtpu.so even on a machine with no TPU, and libtpu prints warnings about
TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES (it cannot find the Cloud TPU metadata) before the backend
fails quietly and JAX falls back to the CPU. Nothing else changes, so the fix is to say what JAX would
end up with anyway: on a host with no accelerator at all, JAX_PLATFORMS=cpu.

The rule, applied once when `vffn_jax` is first imported (before anything initialises JAX's backends):
- an explicit JAX_PLATFORMS (even empty), or a jax_platforms already set in jax.config, always wins;
- nothing is done unless libtpu is installed (or TPU_LIBRARY_PATH points at one);
- nothing is done where an accelerator may be present: a Google PCI device (the way JAX itself counts
  TPU chips), /dev/accel* (TPU v2-v4), /dev/vfio/* (TPU v5e and newer), an NVIDIA or AMD GPU device
  node, or TPU variables set by hand (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES, JAX_FORCE_TPU_INIT).
The TPU pre-flight (`train.py --dry-run --topology ...`) is unaffected: it builds its TPU topology
through libtpu directly (jax.experimental.topologies), whatever JAX_PLATFORMS says.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GOOGLE_PCI_VENDOR_ID = "0x1ae0"
_GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
_TPU_HINT_VARIABLES = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "JAX_FORCE_TPU_INIT")


def _libtpu_installed() -> bool:
    if os.environ.get("TPU_LIBRARY_PATH"):
        return True
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


def _google_pci_device_present() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR_ID:
                    return True
        except OSError:
            continue
    return False


def accelerator_may_be_present() -> bool:
    """True if this host might have a TPU or GPU (erring on the side of True)."""
    if any(os.environ.get(v) for v in _TPU_HINT_VARIABLES):
        return True
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*"):
        return True
    if any(os.path.exists(d) for d in _GPU_DEVICE_NODES):
        return True
    return _google_pci_device_present()


def cpu_only_platforms() -> str | None:
    """'cpu' if JAX would only end up on the CPU anyway but would first load libtpu (and warn); else None."""
    if "JAX_PLATFORMS" in os.environ:
        return None
    if not _libtpu_installed() or accelerator_may_be_present():
        return None
    return "cpu"


def apply() -> None:
    """Sets JAX_PLATFORMS=cpu where `cpu_only_platforms` says so, before JAX initialises a backend."""
    platforms = cpu_only_platforms()
    if platforms is None:
        return
    jax = sys.modules.get("jax")
    if jax is None:  # the usual case: read by jax's config when jax is imported
        os.environ["JAX_PLATFORMS"] = platforms
        return
    # jax was imported first (a library user): its config already read the environment
    try:
        from jax._src import xla_bridge
        if jax.config.jax_platforms or xla_bridge.backends_are_initialized():
            return
    except (ImportError, AttributeError):
        return
    jax.config.update("jax_platforms", platforms)
