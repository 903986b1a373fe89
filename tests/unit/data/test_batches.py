"""Data pipeline (vffn_jax/data/batches.py): packing, shuffling, resume, process sharding, evaluation batches
and the `python -m vffn_jax.data --prepare` command line."""
import json

import grain
import numpy as np
import pytest

from tests.unit.data.corpora import take
from vffn_jax.data.cache_dir import cache_root
from vffn_jax.data.batches import eval_batches, make_batch_iterator
from vffn_jax.data.token_cache import split_tokens
from vffn_jax.testing.cli import call
from vffn_jax.cli import tokenize as tokenize_cli


def test_split_shorter_than_a_sequence(jsonl):
    with pytest.raises(ValueError, match=f"{jsonl.path}.* hold no sequence of seq_len"):
        make_batch_iterator(jsonl, "validation", seq_len=100_000, global_batch=1, seed=0)


# --------------------------------------------------------------------------- batches


def test_packing_reproduces_the_token_stream(jsonl):
    seq = 64
    tokens = split_tokens(jsonl, "train")
    windows = np.concatenate(list(make_batch_iterator(jsonl, "train", seq_len=seq, global_batch=1, seed=0,
                                                      shuffle=False, repeat=False)))
    assert windows.shape == ((len(tokens) - 1) // seq, seq + 1) and windows.dtype == np.int32
    assert np.array_equal(windows[1:, 0], windows[:-1, -1])  # inputs [:, :-1], targets [:, 1:]
    rebuilt = np.concatenate([windows[:, :-1].ravel(), windows[-1:, -1]])
    assert rebuilt.tolist() == tokens[:len(rebuilt)].tolist()


def test_shuffle_is_seeded_and_reshuffles_each_epoch(jsonl):
    kw = dict(seq_len=64, global_batch=8, shuffle=True)
    n_windows = (len(split_tokens(jsonl, "train")) - 1) // 64
    rows = lambda seed: np.concatenate(take(make_batch_iterator(jsonl, "train", seed=seed, **kw), -(-2 * n_windows // 8)))
    a, b = rows(1), rows(2)  # batches run on across the epoch boundary
    assert np.array_equal(a, rows(1)) and not np.array_equal(a[:n_windows], b[:n_windows])
    ordered = np.concatenate(list(make_batch_iterator(jsonl, "train", seed=0, seq_len=64, global_batch=1,
                                                      shuffle=False, repeat=False)))
    first, second = a[:n_windows], a[n_windows:2 * n_windows]
    key = lambda x: sorted(map(bytes, x))
    assert key(first) == key(second) == key(ordered)  # each epoch is a permutation of all windows
    assert not np.array_equal(first, second)


def test_resume_from_state(jsonl):
    make = lambda: make_batch_iterator(jsonl, "train", seq_len=32, global_batch=4, seed=7)
    it = make()
    take(it, 5)
    state = it.get_state()
    expected = take(it, 3)
    fresh = make()
    fresh.set_state(json.loads(json.dumps(state)))  # the state survives serialisation
    assert all(np.array_equal(x, y) for x, y in zip(take(fresh, 3), expected))


def test_resume_through_orbax(jsonl, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = make_batch_iterator(jsonl, "train", seq_len=32, global_batch=4, seed=3)
    take(it, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = take(it, 2)
        fresh = make_batch_iterator(jsonl, "train", seq_len=32, global_batch=4, seed=3)
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert all(np.array_equal(x, y) for x, y in zip(take(fresh, 2), expected))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_make_up_the_global_batch(jsonl, process_count):
    kw = dict(seq_len=32, global_batch=8, seed=5)
    whole = take(make_batch_iterator(jsonl, "train", **kw), 6)
    parts = [take(make_batch_iterator(jsonl, "train", process_index=p, process_count=process_count, **kw), 6)
             for p in range(process_count)]
    for g in range(6):
        assert parts[0][g].shape == (8 // process_count, 33)
        assert np.array_equal(np.concatenate([part[g] for part in parts]), whole[g])


def test_batch_size_must_divide_processes(jsonl):
    with pytest.raises(ValueError, match="train.batch_size=6"):
        make_batch_iterator(jsonl, "train", seq_len=32, global_batch=6, seed=0, process_count=4)


def test_eval_batches(jsonl):
    val = split_tokens(jsonl, "validation")
    batches = eval_batches(jsonl, seq_len=16, global_batch=4, n_batches=3)
    assert len(batches) == 3 and all(b.shape == (4, 17) for b in batches)
    assert np.array_equal(batches[0][0], val[:17]) and np.array_equal(batches[1][0], val[64:81])
    halves = [eval_batches(jsonl, seq_len=16, global_batch=4, n_batches=3, process_index=p, process_count=2)
              for p in range(2)]
    assert all(np.array_equal(np.concatenate([halves[0][i], halves[1][i]]), batches[i]) for i in range(3))
    n_all = (len(val) - 1) // 16 // 4
    assert len(eval_batches(jsonl, seq_len=16, global_batch=4, n_batches=10_000)) == n_all
    with pytest.raises(ValueError, match="fewer than one global batch"):
        eval_batches(jsonl, seq_len=16, global_batch=10_000, n_batches=1)


# --------------------------------------------------------------------------- command line


def test_cli():
    """`vffn-tokenize --prepare-default` (`python -m vffn_jax.data --prepare`): --help, and it reports the default corpus's splits (its cache: the
    session's shared one, named by --cache-dir)."""
    res = call(tokenize_cli.main, "--prepare-default", "--help")
    assert res.returncode == 0 and "--cache-dir" in res.stdout
    res = call(tokenize_cli.main, "--prepare-default", "--cache-dir", cache_root())
    assert res.returncode == 0, res.stderr
    assert "kjv_bible" in res.stdout and "1,166 documents" in res.stdout and "23 documents" in res.stdout
