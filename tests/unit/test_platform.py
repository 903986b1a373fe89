"""vffn_jax/platform.py's decision, in-process: an explicit JAX_PLATFORMS wins, nothing changes without libtpu or
on a host that may have an accelerator, and TPU variables set by hand count as a TPU host. The real start-up
(no libtpu warnings in a fresh interpreter): tests/integration/test_platform.py."""
import importlib.util

from vffn_jax import platform


def test_an_explicit_jax_platforms_wins(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "")
    assert platform.cpu_only_platforms() is None
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert platform.cpu_only_platforms() is None


def test_nothing_changes_without_libtpu_or_on_an_accelerator_host(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    monkeypatch.setattr(platform, "accelerator_may_be_present", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert platform.cpu_only_platforms() is None  # no libtpu: JAX never loads it
    monkeypatch.setenv("TPU_LIBRARY_PATH", "/opt/libtpu.so")
    assert platform.cpu_only_platforms() == "cpu"
    monkeypatch.setattr(platform, "accelerator_may_be_present", lambda: True)
    assert platform.cpu_only_platforms() is None  # a TPU or GPU may be there: JAX chooses as usual


def test_tpu_variables_set_by_hand_count_as_a_tpu_host(monkeypatch):
    for var in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "JAX_FORCE_TPU_INIT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-8")
    assert platform.accelerator_may_be_present()
