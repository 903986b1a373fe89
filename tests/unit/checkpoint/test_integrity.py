"""Checkpoint integrity: checksums written after a step commits, damage caught at restore (local and gs://),
resume falls back to the newest good step, eval.py exits 2 naming the step and the good earlier ones."""
from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.checkpoint import integrity
from vffn_jax.checkpoint.manager import CheckpointDamagedError

# A restore that fails inside Orbax leaves its read coroutine to the garbage collector, which reports it
# in whichever test happens to run then.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*_read_array_index_and_device_put:pytest.PytestUnraisableExceptionWarning")


def _state(seed: int):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"embed": jax.random.normal(k1, (256, 512)), "layer": {"w": jax.random.normal(k2, (64, 32))}}
    opt = {"mu": jax.tree.map(lambda a: a * 0.1, params), "count": jnp.asarray(seed, jnp.int32)}
    return params, opt


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _data_iter():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save_steps(workdir, steps=(1,)):
    manager = ckpt.make_manager(workdir)
    states = {}
    for step in steps:
        states[step] = _state(step)
        it = _data_iter()
        for _ in range(step):
            next(it)
        assert ckpt.save(manager, step, *states[step], it, force=True)
    ckpt.wait_until_finished(manager)
    return manager, states


def _largest(step_dir: epath.Path, item: str = "params") -> epath.Path:
    sizes = integrity.list_files(step_dir)
    rel = max((k for k in sizes if k.startswith(item + "/")), key=lambda k: sizes[k])
    return step_dir / rel


def _overwrite_middle(path: epath.Path, n: int = 64 << 10) -> None:
    data = bytearray(path.read_bytes())
    n = min(n, len(data) // 2)
    mid = (len(data) - n) // 2
    data[mid:mid + n] = np.random.default_rng(0).bytes(n)
    path.write_bytes(bytes(data))


def test_clean_save_restore_verifies(tmp_path):
    manager, states = _save_steps(tmp_path / "run", (1,))
    step_dir = ckpt.checkpoint_dir(tmp_path / "run") / "1"
    files = sorted(p.name for p in step_dir.glob(integrity.PREFIX + "*"))
    assert files == ["vffn_checksums.process_0-of-1.json"]
    doc = json.loads((step_dir / files[0]).read_text())
    assert doc["algorithm"] == "crc32c" and set(doc["sizes"]) == set(doc["digests"])
    assert {k.split("/")[0] for k in doc["sizes"]} >= {"params", "opt_state", "data"}
    assert ckpt.all_steps(tmp_path / "run") == [1] and ckpt.latest_step(tmp_path / "run") == 1
    v = ckpt.verify_step(manager, 1, ("params", "opt_state", "data"))
    assert v.status == "verified" and not v.problems and v.notice is None

    params, opt = states[1]
    it = _data_iter()
    notes = []
    p, o = ckpt.restore(ckpt.make_manager(tmp_path / "run", read_only=True), 1, _abstract(params), _abstract(opt), it,
                        log=notes.append)
    assert notes == []
    jax.tree.map(np.testing.assert_array_equal, p, params)
    jax.tree.map(np.testing.assert_array_equal, o, opt)
    assert next(it) == 1  # the data iterator resumed after the one element consumed before step 1


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "delete"])
def test_damage_is_detected(tmp_path, damage):
    manager, states = _save_steps(tmp_path / "run", (3,))
    step_dir = ckpt.checkpoint_dir(tmp_path / "run") / "3"
    target = _largest(step_dir)
    size = target.stat().length
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:size // 3])
        expect = f"truncated: {size // 3:,} of {size:,} bytes"
    elif damage == "overwrite":
        _overwrite_middle(target)
        expect = "crc32c differs"
    else:
        target.unlink()
        expect = "missing"
    params, opt = states[3]
    with pytest.raises(CheckpointDamagedError) as info:
        ckpt.restore(ckpt.make_manager(tmp_path / "run", read_only=True), 3, _abstract(params), _abstract(opt))
    e = info.value
    assert e.step == 3 and e.item == "params" and e.file == str(target) and expect in e.problem
    assert str(e).startswith("checkpoint step 3 is damaged (params: file ") and str(target) in str(e) and expect in str(e)
    # the optimizer state alone still verifies (each item's files are checked separately)
    assert ckpt.verify_step(manager, 3, ("opt_state",)).status == "verified"


def test_resume_falls_back_to_newest_good_step(tmp_path, monkeypatch):
    manager, states = _save_steps(tmp_path / "run", (10, 20, 30))
    cdir = ckpt.checkpoint_dir(tmp_path / "run")
    _overwrite_middle(_largest(cdir / "30"))
    (cdir / "20" / "opt_state" / "_METADATA").unlink()
    params, opt = states[10]

    real_list = integrity.list_files
    monkeypatch.setattr(integrity, "list_files", lambda d: (_ for _ in ()).throw(OSError("bucket unreachable")))
    with pytest.raises(ckpt.CheckpointUnreadableError, match=r"step 30 could not be checked \(OSError: bucket "
                                                             r"unreachable\): nothing was restored"):
        ckpt.resume_state(ckpt.make_manager(tmp_path / "run"), _abstract(params), _abstract(opt), _data_iter())
    monkeypatch.setattr(integrity, "list_files", real_list)
    assert ckpt.all_steps(tmp_path / "run") == [10, 20, 30]  # a storage error never sets a step aside

    lines = []
    it = _data_iter()
    manager = ckpt.make_manager(tmp_path / "run")
    step, p, o = ckpt.resume_state(manager, _abstract(params), _abstract(opt), it, log=lines.append)
    assert step == 10
    jax.tree.map(np.testing.assert_array_equal, p, params)
    assert int(o["count"]) == 10 and next(it) == 10
    assert len(lines) == 2
    assert lines[0].startswith("vffn_jax: checkpoint step 30 is damaged (params: file ") and "crc32c differs" in lines[0]
    assert "; resuming from step 10 instead (moved to " in lines[0] and "30.damaged-" in lines[0]
    assert "step 20 is damaged (opt_state: file " in lines[1] and "_METADATA missing" in lines[1]
    # the damaged steps are out of Orbax's way: training saves step 20 again
    assert sorted(p.name.split(".")[0] for p in cdir.glob("*.damaged-*")) == ["20", "30"]
    assert ckpt.all_steps(tmp_path / "run") == [10] and list(manager.all_steps()) == [10]
    assert ckpt.save(manager, 20, *_state(20), _data_iter())
    ckpt.wait_until_finished(manager)
    assert ckpt.verify_step(manager, 20, ("params", "opt_state", "data")).status == "verified"

    for step in (10, 20):
        (cdir / str(step) / "params" / "_METADATA").write_text("{}")
    with pytest.raises(CheckpointDamagedError, match=r"every checkpoint step in .* is damaged \(step 20: params: "
                                                     r".*_METADATA truncated.*step 10: .*fresh --workdir"):
        ckpt.resume_state(ckpt.make_manager(tmp_path / "run"), _abstract(params), _abstract(opt), _data_iter())
    assert ckpt.resume_state(ckpt.make_manager(tmp_path / "empty"), _abstract(params), _abstract(opt), None) is None


def test_step_without_checksums_restores_unverified(tmp_path):
    _, states = _save_steps(tmp_path / "run", (5,))
    step_dir = ckpt.checkpoint_dir(tmp_path / "run") / "5"
    for f in step_dir.glob(integrity.PREFIX + "*"):
        f.unlink()
    params, opt = states[5]
    notes = []
    p, _ = ckpt.restore(ckpt.make_manager(tmp_path / "run", read_only=True), 5, _abstract(params), log=notes.append)
    jax.tree.map(np.testing.assert_array_equal, p, params)
    assert len(notes) == 1 and "step 5 has no checksums" in notes[0] and "unverified" in notes[0]
    # damage without checksums is still no raw TensorStore traceback
    target = _largest(step_dir)
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointDamagedError, match="checkpoint step 5 could not be read"):
        ckpt.restore(ckpt.make_manager(tmp_path / "run", read_only=True), 5, _abstract(params), log=notes.append)


def test_partial_checksums_and_shares(tmp_path):
    """Shares are a deterministic split by size; a missing process file degrades to size checks only."""
    sizes = {"a": 10, "b": 9, "c": 2, "d": 1, "e": 1}
    shares = integrity.assign(sizes, 2)
    assert shares == [["a", "d", "e"], ["b", "c"]] and integrity.assign(sizes, 1) == [sorted(sizes, key=lambda k: -sizes[k])]
    _, states = _save_steps(tmp_path / "run", (2,))
    step_dir = ckpt.checkpoint_dir(tmp_path / "run") / "2"
    (step_dir / "vffn_checksums.process_0-of-1.json").unlink()
    for p in range(2):  # as if two processes had saved it, and process 1 never wrote its file
        integrity.write_digests(step_dir, 2, p, 2)
    (step_dir / "vffn_checksums.process_1-of-2.json").unlink()
    v = integrity.verify(step_dir, 2, ["params", "opt_state", "data"])
    assert v.status == "verified" and "process(es) [1] of 2 are missing" in v.notice


def test_gcs_damage_detected(gcs_bucket):
    workdir = f"{gcs_bucket}/run"
    _, states = _save_steps(workdir, (4, 8))
    step_dir = ckpt.checkpoint_dir(workdir) / "8"
    assert str(step_dir).startswith("gs://")
    assert ckpt.all_steps(workdir) == [4, 8] and (step_dir / "vffn_checksums.process_0-of-1.json").exists()
    params, opt = states[8]
    p, _ = ckpt.restore(ckpt.make_manager(workdir, read_only=True), 8, _abstract(params))
    jax.tree.map(np.testing.assert_array_equal, p, params)
    target = _largest(step_dir)
    _overwrite_middle(target)  # rewrites the object through epath/gcsfs
    with pytest.raises(CheckpointDamagedError) as info:
        ckpt.restore(ckpt.make_manager(workdir, read_only=True), 8, _abstract(params))
    assert info.value.step == 8 and info.value.item == "params" and "crc32c differs" in str(info.value)
    assert info.value.file == str(target)
    target.unlink()
    with pytest.raises(CheckpointDamagedError, match=r"checkpoint step 8 is damaged \(params: file gs://.* missing"):
        ckpt.restore(ckpt.make_manager(workdir, read_only=True), 8, _abstract(params))

    lines = []
    step, p, _ = ckpt.resume_state(ckpt.make_manager(workdir), _abstract(states[4][0]), _abstract(states[4][1]),
                                   _data_iter(), log=lines.append)
    assert step == 4 and len(lines) == 1 and "step 8 is damaged" in lines[0] and "8.damaged-" in lines[0]
    jax.tree.map(np.testing.assert_array_equal, p, states[4][0])
    assert ckpt.all_steps(workdir) == [4]


def test_eval_cli_reports_damaged_step(tmp_path, capsys):
    """A real tiny model's checkpoint at steps 2 and 4 (saved directly, no training): damage the largest
    params file of step 4 -> eval.py exits 2 naming step 4 and suggesting --step 2, which then works."""
    import eval as eval_cli
    from vffn_jax import config as config_lib
    from vffn_jax.model import placement

    tiny = {"train.batch_size": 8, "train.seq_len": 32, "model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2,
            "model.d_ff": 128, "run.eval_batches": 1, "data.cache_dir": str(tmp_path / "cache")}
    cfg = config_lib.load_config("tiny", "versatile", tiny)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(cfg.to_json())
    s = placement.setup(cfg, jax.devices()[:1])
    _, params, _ = placement.init_params(cfg.model, s.mesh, cfg.train.seed)
    manager = ckpt.make_manager(workdir, cfg.run)
    for step in (2, 4):
        ckpt.save(manager, step, params, {"count": np.zeros((), np.int32)}, force=True)
    ckpt.wait_until_finished(manager)
    target = _largest(ckpt.checkpoint_dir(workdir) / "4")
    _overwrite_middle(target)

    assert eval_cli.main(["--workdir", str(workdir), "--no-plot", "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint step 4 is damaged (params: file ") and str(target) in err
    assert "--step 2" in err and "Traceback" not in err
    assert eval_cli.main(["--workdir", str(workdir), "--no-plot", "--batches", "1", "--step", "2", "--json"]) == 0
    out = capsys.readouterr().out
    out = json.loads(out[out.find("{\n"):])  # tfds may print "Downloading and preparing dataset..." first
    assert out["step"] == 2 and np.isfinite(out["loss"])


_WORKER = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from vffn_jax.checkpoint import manager as ckpt

port, pid, phase, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
shd = NamedSharding(mesh, P("d"))

def state(step):
    rows = np.arange(256 * 512, dtype=np.float32).reshape(256, 512) * step
    make = lambda a: jax.make_array_from_callback(a.shape, shd, lambda idx: a[idx])
    return {"w": make(rows), "v": make(rows[:, :64] + 1)}, {"mu": make(rows * 0.5)}

abstract = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shd), t)
if phase == "save":
    manager = ckpt.make_manager(workdir)
    for step in (1, 2):
        ckpt.save(manager, step, *state(step), force=True)
    ckpt.wait_until_finished(manager)
    print("RESULT", json.dumps("saved"), flush=True)
else:
    params, opt = state(1)
    lines = []
    try:
        step, p, o = ckpt.resume_state(ckpt.make_manager(workdir), abstract(params), abstract(opt), None,
                                       log=lines.append)
        ok = bool(np.array_equal(np.asarray(jax.device_get(p["w"].addressable_data(0))),
                                 np.asarray(params["w"].addressable_data(0))))
        out = {"step": step, "equal": ok, "lines": lines}
    except ckpt.CheckpointDamagedError as e:
        out = {"error": str(e), "lines": lines}
    print("RESULT", json.dumps(out), flush=True)
'''


def _two_processes(tmp_path, phase: str, workdir) -> list:
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(root)}
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), phase, str(workdir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return results


def test_two_processes_split_hashing_and_agree(tmp_path):
    """Two processes save into one folder: each writes the checksums of its share. A file only process 1
    hashes is damaged in the newest step: both processes skip that step with the same message."""
    workdir = tmp_path / "run"
    assert _two_processes(tmp_path, "save", workdir) == ["saved", "saved"]
    step_dir = ckpt.checkpoint_dir(workdir) / "2"
    docs = [json.loads((step_dir / f"vffn_checksums.process_{p}-of-2.json").read_text()) for p in range(2)]
    assert docs[0]["sizes"] == docs[1]["sizes"] and docs[0]["digests"] and docs[1]["digests"]
    assert not set(docs[0]["digests"]) & set(docs[1]["digests"])
    assert set(docs[0]["digests"]) | set(docs[1]["digests"]) == set(docs[0]["sizes"])
    sizes = docs[0]["sizes"]
    rel = max((k for k in docs[1]["digests"] if k.startswith("params/")), key=lambda k: sizes[k])
    _overwrite_middle(step_dir / rel)
    assert integrity.assign({k: v for k, v in sizes.items()}, 2)[1].count(rel) == 1  # restore splits the same files the same way: only process 1 re-hashes it

    a, b = _two_processes(tmp_path, "resume", workdir)
    assert a == b and a["step"] == 1 and a["equal"]
    assert len(a["lines"]) == 1 and a["lines"][0].startswith("vffn_jax: checkpoint step 2 is damaged (params: file ")
    assert rel in a["lines"][0] and "crc32c differs" in a["lines"][0]
