"""Test set-up: 8 fake CPU devices (before jax is imported), a persistent compile cache, and a real
GCS emulator (fake-gcs-server on 127.0.0.1) for the `gs://` tests."""
import os
import uuid

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def gcs_emulator():
    """One fake-gcs-server for the session; its variables are exported so subprocesses use it too."""
    from vffn_jax.testing.gcs_emulator import GcsEmulator

    emu = GcsEmulator().start()
    saved = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)
    yield emu
    emu.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """A fresh bucket on the emulator: returns 'gs://NAME'."""
    return gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:12]}")

