"""Checkpoint manager (vffn_jax/checkpoint/manager.py): restoring the data-iterator state saved by another
number of processes."""
import json

import numpy as np
import pytest


def test_data_state_from_another_process_count(tmp_path):
    """Saved by 2 processes, restored by 1: the stream restarts at the saved global batch index, or the
    run is refused with how to continue when the saved state does not carry over."""
    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.config import DataConfig
    from vffn_jax.data.batches import make_batch_iterator

    data_dir = tmp_path / "checkpoints" / "3" / "data"
    data_dir.mkdir(parents=True)
    for p in range(2):
        (data_dir / f"process_{p}-of-2.json").write_text(json.dumps({"next_index": 3}))
    manager = type("M", (), {"directory": tmp_path / "checkpoints"})()
    kw = dict(seq_len=32, global_batch=4, seed=0)
    it = make_batch_iterator(DataConfig(), "train", **kw)
    ckpt._restore_data_state_elsewhere(manager, 3, it)
    fresh = make_batch_iterator(DataConfig(), "train", **kw)
    for _ in range(3):
        next(fresh)
    np.testing.assert_array_equal(next(it), next(fresh))

    (data_dir / "process_1-of-2.json").write_text(json.dumps({"next_index": 3, "workers": [1, 2]}))
    with pytest.raises(ckpt.CheckpointMismatchError, match="Resume with 2 process"):
        ckpt._restore_data_state_elsewhere(manager, 3, it)
