"""Checkpoint integrity across processes: two processes joined by jax.distributed save into one folder, each
hashing its share of the files, and agree on skipping a damaged step at resume (vffn_jax/checkpoint/integrity.py)."""
from __future__ import annotations

import json

import numpy as np

from tests.unit.checkpoint.test_integrity import _overwrite_middle
from vffn_jax.checkpoint import integrity
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.testing.processes import run_in_processes


def _sharded_state(step: int):
    """Params and optimizer state sharded over the 4 devices of both processes (2 each)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    shd = NamedSharding(mesh, P("d"))
    rows = np.arange(256 * 512, dtype=np.float32).reshape(256, 512) * step

    def make(a):
        return jax.make_array_from_callback(a.shape, shd, lambda idx: a[idx])

    return {"w": make(rows), "v": make(rows[:, :64] + 1)}, {"mu": make(rows * 0.5)}


def _abstract(tree):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def save_two_steps(workdir: str) -> str:
    """In each process: save steps 1 and 2."""
    manager = ckpt.make_manager(workdir)
    for step in (1, 2):
        ckpt.save(manager, step, *_sharded_state(step), force=True)
    ckpt.wait_until_finished(manager)
    return "saved"


def resume(workdir: str) -> dict:
    """In each process: resume from the newest good step; the step, whether its params are step 1's, the log."""
    import jax

    params, opt = _sharded_state(1)
    lines = []
    try:
        step, p, _ = ckpt.resume_state(ckpt.make_manager(workdir), _abstract(params), _abstract(opt), None,
                                       log=lines.append)
        ok = bool(np.array_equal(np.asarray(jax.device_get(p["w"].addressable_data(0))),
                                 np.asarray(params["w"].addressable_data(0))))
        return {"step": step, "equal": ok, "lines": lines}
    except ckpt.CheckpointDamagedError as e:
        return {"error": str(e), "lines": lines}


def test_two_processes_split_hashing_and_agree(tmp_path):
    """Two processes save into one folder: each writes the checksums of its share. A file only process 1
    hashes is damaged in the newest step: both processes skip that step with the same message."""
    workdir = tmp_path / "run"
    assert run_in_processes(save_two_steps, 2, str(workdir)) == ["saved", "saved"]
    step_dir = ckpt.checkpoint_dir(workdir) / "2"
    docs = [json.loads((step_dir / f"vffn_checksums.process_{p}-of-2.json").read_text()) for p in range(2)]
    assert docs[0]["sizes"] == docs[1]["sizes"] and docs[0]["digests"] and docs[1]["digests"]
    assert not set(docs[0]["digests"]) & set(docs[1]["digests"])
    assert set(docs[0]["digests"]) | set(docs[1]["digests"]) == set(docs[0]["sizes"])
    sizes = docs[0]["sizes"]
    rel = max((k for k in docs[1]["digests"] if k.startswith("params/")), key=lambda k: sizes[k])
    _overwrite_middle(step_dir / rel)
    assert integrity.assign({k: v for k, v in sizes.items()}, 2)[1].count(rel) == 1  # restore splits the same files the same way: only process 1 re-hashes it

    a, b = run_in_processes(resume, 2, str(workdir))
    assert a == b and a["step"] == 1 and a["equal"]
    assert len(a["lines"]) == 1 and a["lines"][0].startswith("vffn_jax: checkpoint step 2 is damaged (params: file ")
    assert rel in a["lines"][0] and "crc32c differs" in a["lines"][0]
