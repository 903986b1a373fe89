"""Checkpoint integrity: checksums written after a step commits, damage caught at restore (local and gs://),
resume falls back to the newest good step, eval.py exits 2 naming the step and the good earlier ones. Two processes
sharing the hashing: tests/integration/checkpoint/test_integrity.py."""
from __future__ import annotations

import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.checkpoint import integrity
from vffn_jax.checkpoint.manager import CheckpointDamagedError
from vffn_jax.testing import cli

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


def test_eval_cli_reports_damaged_step(tiny_run, tmp_path):
    """A real tiny model's checkpoints at steps 2 and 4 (a copy of the session's `tiny_run`): damage the largest
    params file of step 4 -> eval.py exits 2 naming step 4 and suggesting --step 2, which then works."""
    import eval as eval_cli

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("tb"))
    assert ckpt.all_steps(workdir) == [2, 4]
    target = _largest(ckpt.checkpoint_dir(workdir) / "4")
    _overwrite_middle(target)

    r = cli.call(eval_cli.main, "--workdir", workdir, "--no-plot", "--batches", "1")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: checkpoint step 4 is damaged (params: file ") and str(target) in r.stderr
    assert "--step 2" in r.stderr and "Traceback" not in r.stderr
    r = cli.call(eval_cli.main, "--workdir", workdir, "--no-plot", "--batches", "1", "--step", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.find("{\n"):])  # tfds may print "Downloading and preparing dataset..." first
    assert out["step"] == 2 and np.isfinite(out["loss"])
