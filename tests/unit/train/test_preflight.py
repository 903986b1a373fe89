"""TPU pre-flight: the real train step AOT-compiled for a TPU topology on this CPU-only host, through train.py's
`main` in-process (libtpu describes the topology and compiles for it beside the tests' CPU backend)."""
import json

import pytest

import train as train_cli
from vffn_jax.testing.cli import call
from vffn_jax.testing.markers import needs_libtpu
from vffn_jax.train import preflight

pytestmark = [
    pytest.mark.tpu_extra,  # every test here needs the TPU extra: python -m pytest -q -m tpu_extra
    # the session's persistent compile cache holds TPU programs that a compile-only client cannot load back
    # (it compiles them instead); a subprocess printed the same warning to its own stderr
    pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry:UserWarning"),
]


def _dry_run(*args):
    return call(train_cli.main, "--config", "tiny", "--dry-run", *args)


@pytest.mark.slow  # three TPU programs (train step x 2 remat policies, eval step): ~20 s; `-m tpu_extra` runs it
@needs_libtpu
def test_tiny_step_compiles_for_a_multi_host_tpu_topology_and_reports_memory(monkeypatch):
    compiled = []  # the train-step programs actually compiled (compile_train_step memoises the rest)
    compile_once = preflight._compile_train_step
    monkeypatch.setattr(preflight, "_compile_train_step",
                        lambda cfg, devices: compiled.append(cfg.model.remat) or compile_once(cfg, devices))
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
    # the run's own config (remat none, attention xla) is the sweep's first row: compiled once for both, same report
    assert compiled == ["none", "full"]
    same = rows["remat=none attention=xla"]
    assert {k: v for k, v in same.items() if k in pf} == {k: v for k, v in pf.items() if k != "eval"}
    assert "eval" not in same  # each caller got its own copy of the memoised report


@needs_libtpu
def test_a_step_too_big_for_the_chip_does_not_fit():
    res = _dry_run("--topology", "v5e:2x2", "--json", "--set", "train.batch_size=64", "--set", "train.seq_len=8192",
                   "--set", "model.vocab_size=65536", "--set", "model.remat=none")
    assert res.returncode == 0, res.stderr[-3000:]
    pf = json.loads(res.stdout)["preflight"]
    # the TPU compiler refuses it, naming the temporaries it needed and the HBM it has
    assert pf["temp_bytes"] > pf["hbm_bytes"] > 15 * 1024 ** 3 and pf["fits"] is False
    assert pf["per_device_bytes"] > pf["temp_bytes"]


def test_unknown_topology_is_a_clear_error(tmp_path):
    res = _dry_run("--topology", "v9z:1x1")
    assert res.returncode == 2 and "--topology 'v9z:1x1'" in res.stderr and "Traceback" not in res.stderr
    res = call(train_cli.main, "--config", "tiny", "--topology", "v4:2x2x2", "--workdir", tmp_path / "x")
    assert res.returncode == 2 and "use it with --dry-run" in res.stderr
