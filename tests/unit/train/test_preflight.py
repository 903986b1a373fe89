"""TPU pre-flight: the real train step AOT-compiled for a TPU topology on this CPU-only host."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vffn_jax.testing.markers import needs_libtpu

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.tpu_extra  # every test here needs the TPU extra: python -m pytest -q -m tpu_extra


def _dry_run(*args):
    return subprocess.run([sys.executable, "train.py", "--config", "tiny", "--dry-run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_tiny_step_compiles_for_a_multi_host_tpu_topology_and_reports_memory():
    # v5p:2x2x2 is 8 chips on 2 hosts: a multi-host topology, sharded fsdp x tensor
    res = _dry_run("--topology", "v5p:2x2x2", "--json", "--set", "mesh.data=1", "--set", "mesh.fsdp=-1",
                   "--set", "mesh.tensor=2", "--set", "model.attention=xla",
                   "--sweep", "model.remat=none,full;model.attention=xla")
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    pf = info["preflight"]
    assert pf["device_kind"] == "TPU v5" and pf["devices"] == 8 and pf["processes"] == 2
    assert pf["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert pf["hbm_bytes"] == 95 * 1024 ** 3
    # params + Adam moments (f32) sharded 8 ways are a floor for the arguments; the step needs temporaries too
    assert pf["argument_bytes"] >= 3 * 4 * info["params_total"] / 8
    assert pf["per_device_bytes"] >= pf["argument_bytes"] + pf["temp_bytes"] - pf["alias_bytes"]
    assert pf["temp_bytes"] > 0 and pf["fits"] is True
    # speed: traced FLOPs equal the analytic count (remat none), and a roofline bound from v5p's figures
    assert pf["flops_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert pf["peak_flops"] == 459e12 and pf["hbm_bandwidth"] == 2765e9
    step_s = max(pf["flops_step_traced"] / 8 / pf["peak_flops"], pf["bytes_per_device_lower_bound"] / pf["hbm_bandwidth"])
    assert pf["roofline_step_s"] == pytest.approx(step_s) and 0 < pf["roofline_mfu"] <= 1
    # the sweep compiles both remat policies; full remat recomputes the forward pass (~4/3 of the FLOPs)
    rows = {r["label"]: r for r in info["sweep"]["rows"]}
    assert set(rows) == {"remat=none attention=xla", "remat=full attention=xla"}
    assert 1.25 < rows["remat=full attention=xla"]["flops_ratio"] < 1.34
    assert rows["remat=full attention=xla"]["temp_bytes"] < rows["remat=none attention=xla"]["temp_bytes"]
    assert info["sweep"]["best"]["label"] in rows


@needs_libtpu
def test_a_step_too_big_for_the_chip_does_not_fit():
    res = _dry_run("--topology", "v5e:2x2", "--json", "--set", "train.batch_size=64", "--set", "train.seq_len=8192",
                   "--set", "model.vocab_size=65536", "--set", "model.remat=none")
    assert res.returncode == 0, res.stderr[-3000:]
    pf = json.loads(res.stdout)["preflight"]
    # the TPU compiler refuses it, naming the temporaries it needed and the HBM it has
    assert pf["temp_bytes"] > pf["hbm_bytes"] > 15 * 1024 ** 3 and pf["fits"] is False
    assert pf["per_device_bytes"] > pf["temp_bytes"]


def test_unknown_topology_is_a_clear_error():
    res = _dry_run("--topology", "v9z:1x1")
    assert res.returncode == 2 and "--topology 'v9z:1x1'" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "train.py", "--config", "tiny", "--topology", "v4:2x2x2", "--workdir", "x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "use it with --dry-run" in res.stderr
