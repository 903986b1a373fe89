"""With the TPU extra (libtpu) installed on a host without TPUs, importing vffn_jax in a fresh interpreter keeps JAX from loading
libtpu, so ordinary CPU commands print none of libtpu's TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES
warnings (vffn_jax/platform.py); an explicit JAX_PLATFORMS always wins."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vffn_jax import platform
from vffn_jax.testing.markers import needs_libtpu

ROOT = Path(__file__).resolve().parents[2]
LIBTPU_WARNINGS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu_init_utils")

off_accelerators = pytest.mark.skipif(platform.accelerator_may_be_present(),
                                      reason="this host may have a TPU or GPU: libtpu's warnings concern hosts without one")


def _python(code: str, tmp_path, **extra_env) -> subprocess.CompletedProcess:
    """A fresh interpreter outside the repository, with JAX_PLATFORMS unset (conftest sets it for pytest)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra_env)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def _warned(stderr: str) -> list[str]:
    return [w for w in LIBTPU_WARNINGS if w in stderr]


@pytest.mark.parametrize("code", ["import vffn_jax, jax; print(jax.devices())",
                                  "import jax, vffn_jax; print(jax.devices())",  # a library user importing jax first
                                  "from vffn_jax import config; import jax; print(jax.devices())"])
@needs_libtpu
@off_accelerators
def test_no_libtpu_warnings_on_a_cpu_host(tmp_path, code):
    control = _python("import jax; print(jax.devices())", tmp_path)
    if not _warned(control.stderr):
        pytest.skip("this libtpu prints no start-up warnings here even without vffn_jax: nothing to check")
    res = _python(code, tmp_path)
    assert "CpuDevice" in res.stdout
    assert not _warned(res.stderr), f"libtpu warnings on a CPU host after importing vffn_jax:\n{res.stderr}"
