"""`data.path=synthetic` (vffn_jax/data/synthetic.py): random windows, no files, a pure function of the step."""
import numpy as np

from tests.unit.data.corpora import take
from vffn_jax.config import DataConfig
from vffn_jax.data.batches import eval_batches, make_batch_iterator


def test_synthetic_batches_are_deterministic_resumable_and_in_the_vocabulary(tmp_path):
    cfg = DataConfig(path="synthetic", cache_dir=str(tmp_path / "cache"))
    kw = dict(seq_len=16, global_batch=4, seed=0)
    a = take(make_batch_iterator(cfg, "train", **kw), 4)
    assert all(b.shape == (4, 17) and b.dtype == np.int32 and 0 <= b.min() and b.max() < 257 for b in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, take(make_batch_iterator(cfg, "train", **kw), 4)))
    assert not np.array_equal(a[0], a[1])
    it = make_batch_iterator(cfg, "train", **kw)
    next(it)
    state = it.get_state()
    resumed = make_batch_iterator(cfg, "train", **kw)
    resumed.set_state(state)
    assert np.array_equal(next(resumed), a[1])
    halves = [next(make_batch_iterator(cfg, "train", **kw, process_index=p, process_count=2)) for p in range(2)]
    assert np.array_equal(np.concatenate(halves), a[0])  # each process gets its rows of the same global batch
    other_seed = DataConfig(path="synthetic", shuffle_seed=1)
    assert not np.array_equal(next(make_batch_iterator(other_seed, "train", **kw)), a[0])
    val = eval_batches(cfg, seq_len=16, global_batch=4, n_batches=3)
    assert len(val) == 3 and not any(np.array_equal(v, t) for v, t in zip(val, a))
    assert not (tmp_path / "cache").exists()  # nothing read, nothing written
