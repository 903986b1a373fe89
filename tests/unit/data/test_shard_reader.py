"""Token-shard corpora (manifest.json + flat shards, local and gs://): windows, process slicing, resume,
mixtures, start-up checks, the trainer's use of make_batch_iterator / eval_batches, and training from a
corpus tokenised once (nothing tokenised or copied at train time). The sha256 check split over real
processes: tests/integration/data/test_shard_reader.py."""
import json
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.unit.data.corpora import shard_arrays, write_corpus
from vffn_jax import storage
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.config import ConfigError, DataConfig, load_config
from vffn_jax.data import batches as data_lib
from vffn_jax.data import shard_reader as shards_lib
from vffn_jax.data import token_cache
from vffn_jax.data.manifest import read_manifest
from vffn_jax.data.batches import batch_dataset, check_corpus, eval_batches, make_batch_iterator, shard_sources
from vffn_jax.testing.shapes import tiny_config
from vffn_jax.train import loop as trainer
from vffn_jax.cli import tokenize as tokenize_cli

SEQ = 16


def reference_windows(arrays, seq_len=SEQ) -> np.ndarray:
    """Windows of the concatenated shards that do not cross a shard boundary, in order."""
    flat, starts, out = np.concatenate(arrays), np.cumsum([0] + [len(a) for a in arrays]), []
    for a, s in zip(arrays, starts):
        out += [flat[s + w * seq_len: s + w * seq_len + seq_len + 1] for w in range((len(a) - 1) // seq_len)]
    return np.stack(out).astype(np.int32)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    train = shard_arrays(rng, [400, 17, 161, 1000, 16, 333])  # 17 -> 1 window, 16 -> none
    val = shard_arrays(rng, [200, 90])
    write_corpus(tmp_path / "c", {"train": train, "validation": val})
    return tmp_path / "c", train, val


def batches(cfg, n, *, process_index=0, process_count=1, seed=0, global_batch=8, **kw):
    it = make_batch_iterator(cfg, "train", seq_len=SEQ, global_batch=global_batch, seed=seed,
                             process_index=process_index, process_count=process_count, **kw)
    return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------- windows


def test_windows_match_numpy_reference(corpus):
    folder, train, val = corpus
    ref = reference_windows(train)
    (src,), weights = shard_sources(DataConfig(path=str(folder)), "train", SEQ)
    assert weights == [1.0] and len(src) == len(ref) == 24 + 1 + 10 + 62 + 0 + 20
    np.testing.assert_array_equal(np.stack([src[i] for i in range(len(src))]), ref)
    np.testing.assert_array_equal(src.read_many([5, 0, 30, 5]), ref[[5, 0, 30, 5]])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[7], ref[7])  # for grain worker processes
    # the manifest file itself works too; unshuffled, unrepeated batches are the windows in order
    cfg = DataConfig(path=str(folder / "manifest.json"))
    got = batches(cfg, len(ref) // 8, shuffle=False, repeat=False)
    np.testing.assert_array_equal(np.concatenate(got), ref[: len(ref) // 8 * 8])
    ev = eval_batches(cfg, seq_len=SEQ, global_batch=4, n_batches=100)
    np.testing.assert_array_equal(np.concatenate(ev), reference_windows(val)[:16])


def test_windows_on_gcs_are_ranged_reads(tmp_path, gcs_bucket, monkeypatch):
    rng = np.random.default_rng(1)
    train, val = shard_arrays(rng, [3000, 700, 2000], hi=60000), shard_arrays(rng, [500])
    write_corpus(f"{gcs_bucket}/corpus", {"train": train, "validation": val})
    cfg = DataConfig(path=f"{gcs_bucket}/corpus")
    (src,), _ = shard_sources(cfg, "train", SEQ)  # sha256 of every shard checked here (whole reads)
    reads = []
    fs = storage.gcs_fs()
    real_ranges, real_file = fs.cat_ranges, fs.cat_file
    monkeypatch.setattr(fs, "cat_ranges", lambda p, s, e, **kw: reads.extend(np.subtract(e, s)) or real_ranges(p, s, e, **kw))
    monkeypatch.setattr(fs, "cat_file", lambda p, start, end, **kw: reads.append(end - start) or real_file(p, start=start, end=end, **kw))
    ref = reference_windows(train)
    some = list(range(0, len(src), 7)) + [len(src) - 1]  # one ranged GET each
    np.testing.assert_array_equal(np.stack([src[i] for i in some]), ref[some])
    np.testing.assert_array_equal(src.read_many(list(range(len(src)))[::-1]), ref[::-1])  # concurrent GETs
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src)).read_many([3, 1]), ref[[3, 1]])
    got = batches(cfg, 4, shuffle=False, repeat=False, global_batch=16)
    np.testing.assert_array_equal(np.concatenate(got), ref[:64])
    assert reads and set(reads) == {(SEQ + 1) * 2}  # exactly one window's bytes per read
    assert data_lib._READ_GCS.num_threads > data_lib._READ.num_threads


def test_holdout_when_the_manifest_has_no_validation_shards(tmp_path):
    rng = np.random.default_rng(2)
    train = shard_arrays(rng, [500, 300, 700])
    write_corpus(tmp_path / "c", {"train": train})
    ref = reference_windows(train)  # 31 + 18 + 43 = 92 windows; 10% held out = the last 9
    cfg = DataConfig(path=str(tmp_path / "c"), holdout_fraction=0.1)
    (tr,), _ = shard_sources(cfg, "train", SEQ)
    (va,), _ = shard_sources(cfg, "validation", SEQ)
    assert (len(tr), len(va)) == (83, 9)
    np.testing.assert_array_equal(np.stack([va[i] for i in range(9)]), ref[83:])
    np.testing.assert_array_equal(np.stack([tr[i] for i in range(83)]), ref[:83])
    with pytest.raises(ConfigError, match="holdout_fraction=0"):
        shard_sources(DataConfig(path=str(tmp_path / "c"), holdout_fraction=0), "validation", SEQ)


# --------------------------------------------------------------------------- processes and resume


@pytest.fixture
def mixture(tmp_path):
    """Two manifests whose tokens tell them apart: a in [0, 100), b in [100, 200)."""
    rng = np.random.default_rng(3)
    write_corpus(tmp_path / "a", {"train": shard_arrays(rng, [3000, 2000], 0, 100),
                                  "validation": shard_arrays(rng, [800], 0, 100)})
    write_corpus(tmp_path / "b", {"train": shard_arrays(rng, [1500], 100, 200),
                                  "validation": shard_arrays(rng, [300], 100, 200)})
    return lambda wa, wb: DataConfig(mixture=f"{tmp_path / 'a'}={wa},{tmp_path / 'b'}={wb}")


@pytest.fixture(params=["manifest", "mixture"])
def any_cfg(request, corpus, mixture):
    return DataConfig(path=str(corpus[0])) if request.param == "manifest" else mixture(3, 1)


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_is_independent_of_process_count(any_cfg, process_count):
    one = batches(any_cfg, 16)  # 16 x 8 > one epoch of the manifest (117 windows): crosses a reshuffle
    parts = [batches(any_cfg, 16, process_index=p, process_count=process_count) for p in range(process_count)]
    for g in range(16):
        np.testing.assert_array_equal(np.concatenate([part[g] for part in parts]), one[g])
    assert not np.array_equal(one[0], batches(any_cfg, 1, seed=1)[0])


def test_resume_from_another_process_count(any_cfg):
    """What checkpoint._restore_data_state_elsewhere does: a state saved by 2 processes set on 4."""
    it = make_batch_iterator(any_cfg, "train", seq_len=SEQ, global_batch=8, seed=0, process_index=1, process_count=2)
    for _ in range(5):
        next(it)
    state = it.get_state()
    assert state == {"next_index": 5}
    resumed = []
    for p in range(4):
        r = make_batch_iterator(any_cfg, "train", seq_len=SEQ, global_batch=8, seed=0, process_index=p, process_count=4)
        r.set_state(state)
        resumed.append([next(r) for _ in range(3)])
    ref = batches(any_cfg, 8)
    for g in range(3):
        np.testing.assert_array_equal(np.concatenate([r[g] for r in resumed]), ref[5 + g])


def test_a_process_reads_only_its_rows(corpus, monkeypatch):
    cfg, P, B, G = DataConfig(path=str(corpus[0])), 4, 8, 12
    (src,), _ = shard_sources(cfg, "train", SEQ)
    log = []  # (id of the source read, window index); grain's prefetch threads may still add to it later
    real = shards_lib.ShardWindows.read_many
    monkeypatch.setattr(shards_lib.ShardWindows, "read_many",
                        lambda self, idx: log.extend((id(self), i) for i in idx) or real(self, idx))
    monkeypatch.setattr(shards_lib.ShardWindows, "__getitem__", lambda self, i: pytest.fail("single-window read"))
    ds = batch_dataset(src, seq_len=SEQ, global_batch=B, seed=0, repeat=True)
    rows = []  # rows[g] = the windows of global batch g, in row order
    for g in range(G):
        log.clear()
        ds[g]
        rows.append([i for _, i in log])
    iterators = []  # kept alive: their sources' ids stay unique
    for p in range(P):
        seen = {k for k, _ in log} | {id(src)}
        it = make_batch_iterator(cfg, "train", seq_len=SEQ, global_batch=B, seed=0, process_index=p, process_count=P)
        iterators.append(it)
        for _ in range(3):
            next(it)  # grain prefetches a few batches more: all must still be this process's rows
        mine = [i for k, i in list(log) if k not in seen]
        own = [w for g in range(G) for w in rows[g][p * B // P:(p + 1) * B // P]]
        assert len(mine) >= 3 * B // P and set(mine) <= set(own), p
        assert len(mine) <= len(own)


# --------------------------------------------------------------------------- mixtures


def test_mixture_is_deterministic_and_follows_the_weights(mixture):
    cfg = mixture(3, 1)
    assert cfg.mixture_items()[0][1] == 0.75
    first, again = batches(cfg, 40), batches(cfg, 40)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    rows = np.concatenate(first)
    from_a = rows.max(axis=1) < 100
    assert np.all(from_a | (rows.min(axis=1) >= 100))  # every window from one source
    assert abs(from_a.mean() - 0.75) < 0.02
    # each batch's composition is deterministic (grain's interleave of integer proportions)
    assert [int((b.max(axis=1) < 100).sum()) for b in first[:4]] == [int((b.max(axis=1) < 100).sum()) for b in again[:4]]
    # windows repeat only after a source's epoch: b (93 windows) is shown 80 times in 40 batches
    b_rows = rows[~from_a]
    assert len({r.tobytes() for r in b_rows}) == len(b_rows)
    # validation: both manifests' validation windows, mixed with the same weights
    ev = np.concatenate(eval_batches(cfg, seq_len=SEQ, global_batch=4, n_batches=100))
    assert 0 < (ev.max(axis=1) < 100).sum() and 0 < (ev.min(axis=1) >= 100).sum()


def test_mixture_weight_change_at_resume(mixture):
    old, new = mixture(1, 1), mixture(4, 1)
    it = make_batch_iterator(old, "train", seq_len=SEQ, global_batch=8, seed=0)
    for _ in range(6):
        next(it)
    resumed = make_batch_iterator(new, "train", seq_len=SEQ, global_batch=8, seed=0)
    resumed.set_state(it.get_state())
    got = [next(resumed) for _ in range(20)]
    ref = batches(new, 26)[6:]  # the new weights' stream from the saved position
    for x, y in zip(got, ref):
        np.testing.assert_array_equal(x, y)
    assert abs((np.concatenate(got).max(axis=1) < 100).mean() - 0.8) < 0.03


# --------------------------------------------------------------------------- start-up errors


def test_tokenizer_and_vocab_errors(tmp_path):
    other = {"name": "bpe-400", "spec": "/data/bpe.json", "sha256": "ab" * 32, "vocab_size": 400, "eos_id": 0}
    write_corpus(tmp_path / "bpe", {"train": [np.arange(100)]}, tokenizer=other)
    with pytest.raises(ConfigError) as err:
        make_batch_iterator(DataConfig(path=str(tmp_path / "bpe")), "train", seq_len=SEQ, global_batch=2, seed=0)
    assert "bpe-400" in str(err.value) and "byte" in str(err.value) and "data.tokenizer" in str(err.value)
    write_corpus(tmp_path / "byte", {"train": [np.arange(100)]})
    with pytest.raises(ConfigError, match=r"model.vocab_size=200 is smaller .* \(257 tokens\)"):
        check_corpus(DataConfig(path=str(tmp_path / "byte")), model_vocab_size=200)
    assert [m.path for m in check_corpus(DataConfig(path=str(tmp_path / "byte")), model_vocab_size=257)]
    mix = DataConfig(mixture=f"{tmp_path / 'byte'}=1,{tmp_path / 'bpe'}=1")
    with pytest.raises(ConfigError, match="every manifest of a mixture must use one tokenizer") as err:
        check_corpus(mix)
    assert "bpe-400" in str(err.value) and "'byte'" in str(err.value)


def test_shard_errors(corpus):
    folder, train, _ = corpus
    cfg = DataConfig(path=str(folder))
    shard = folder / "train-0002.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[::-1])  # same size, other bytes
    with pytest.raises(ConfigError, match=r"train-0002.bin: its sha256 differs from the one in .*manifest.json"):
        shard_sources(cfg, "train", SEQ)
    shard_sources(DataConfig(path=str(folder), verify_shards="size"), "train", SEQ)  # size only: accepted
    shard.write_bytes(raw[:-2])
    with pytest.raises(ConfigError, match=r"train-0002.bin has 320 bytes but .*manifest.json lists 161 uint16 tokens"):
        shard_sources(cfg, "train", SEQ)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard .*train-0002.bin listed in .*manifest.json is missing; copy"):
        shard_sources(cfg, "train", SEQ)
    shard.write_bytes(raw)
    shard_sources(cfg, "train", SEQ)
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        read_manifest(str(folder / "nothing"))


def test_shard_errors_on_gcs(gcs_bucket):
    rng = np.random.default_rng(4)
    write_corpus(f"{gcs_bucket}/c", {"train": shard_arrays(rng, [300, 200])})
    cfg = DataConfig(path=f"{gcs_bucket}/c/manifest.json")
    obj = storage.as_path(f"{gcs_bucket}/c/train-0001.bin")
    raw = obj.read_bytes()
    obj.write_bytes(raw[:100])
    with pytest.raises(ConfigError, match=r"gs://.*/c/train-0001.bin has 100 bytes"):
        shard_sources(cfg, "train", SEQ)
    obj.write_bytes(bytes(len(raw)))
    with pytest.raises(ConfigError, match=r"gs://.*/c/train-0001.bin: its sha256 differs"):
        shard_sources(cfg, "train", SEQ)
    obj.unlink()
    with pytest.raises(FileNotFoundError, match=r"gs://.*/c/train-0001.bin listed in .* is missing"):
        shard_sources(cfg, "train", SEQ)


def test_mixture_config_errors(tmp_path, corpus):
    path = str(corpus[0])
    with pytest.raises(ConfigError, match="data.mixture=.* and data.path=.* are both set"):
        load_config("tiny", overrides={"data.path": path, "data.mixture": f"{path}=1"})
    with pytest.raises(ConfigError, match="are both set"):
        make_batch_iterator(DataConfig(path=path, mixture=f"{path}=1"), "train", seq_len=SEQ, global_batch=2, seed=0)
    for bad in (f"{path}=0", f"{path}", f"{path}=x,{path}2=1", f"{path}=-1"):
        with pytest.raises(ConfigError, match="is not PATH=WEIGHT with a positive weight"):
            load_config("tiny", overrides={"data.mixture": bad})
    with pytest.raises(ConfigError, match="verify_shards"):
        load_config("tiny", overrides={"data.verify_shards": "md5"})
    with pytest.raises(FileNotFoundError, match="data.mixture entry=.*manifest.json not found"):
        shard_sources(DataConfig(mixture=f"{path}=1,{tmp_path / 'none'}=1"), "train", SEQ)
    with pytest.raises(ConfigError, match="read in place"):
        token_cache.split_tokens(DataConfig(path=path), "train")


# --------------------------------------------------------------------------- as the trainer uses them


def test_trainer_usage_on_a_manifest_folder(corpus):
    folder, train, val = corpus
    cfg = load_config("tiny", overrides={"data.path": str(folder), "train.seq_len": SEQ, "train.batch_size": 4,
                                         "run.eval_batches": 3})
    check_corpus(cfg.data, cfg.model.vocab_size)
    pindex, pcount = 0, 1
    data_it = make_batch_iterator(cfg.data, "train", seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                                  seed=cfg.data.shuffle_seed, process_index=pindex, process_count=pcount)
    eval_data = eval_batches(cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                             n_batches=cfg.run.eval_batches, process_index=pindex, process_count=pcount)
    b = next(data_it)
    assert b.shape == (4, SEQ + 1) and b.dtype == np.int32
    ref = {r.tobytes() for r in reference_windows(train)}
    assert all(r.tobytes() in ref for r in b)
    assert len(eval_data) == 3 and all(e.shape == (4, SEQ + 1) for e in eval_data)
    np.testing.assert_array_equal(np.concatenate(eval_data), reference_windows(val)[:12])
    assert data_it.get_state() == {"next_index": 1}


# --------------------------------------------------------------------------- training from a tokenised corpus


def _stdlib_docs(tmp_path) -> Path:
    """A few real documents: some standard-library modules as .jsonl."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [{"text": (root / name).read_text()} for name in ("abc.py", "bisect.py", "colorsys.py", "keyword.py")]
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs * 3))
    return folder


def _losses(workdir) -> dict[int, float]:
    text = (storage.as_path(workdir) / "metrics.jsonl").read_text()
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


def _train_twice(corpus, workdir, cache):
    """Trains the shared tiny shape to step 2, then resumes to 4; its own data.cache_dir shows what was cached."""
    cfg = tiny_config("versatile", {"data.path": str(corpus), "data.cache_dir": str(cache)})
    trainer.train(cfg, workdir, progress=False, stop_at=2)
    summary = trainer.train(cfg, workdir, progress=False)  # the same call resumes
    assert ckpt.all_steps(workdir) == [2, 4]
    return _losses(workdir), summary["eval"]["loss"]


def test_tokenised_corpus_trains_locally_and_from_a_bucket(tmp_path, gcs_bucket):
    """A corpus tokenised once (python -m vffn_jax.data tokenize) trains from its manifest on a local disk and
    from a bucket with the same losses, across a stop and a resume, tokenising and copying nothing."""
    raw = _stdlib_docs(tmp_path)
    args = ["--input", str(raw), "--tokenizer", "byte", "--shard-tokens", "20000", "--validation-fraction", "0.2",
            "--workers", "1", "--quiet"]
    assert tokenize_cli.main([*args, "--output", str(tmp_path / "corpus")]) == 0
    assert tokenize_cli.main([*args, "--output", f"{gcs_bucket}/corpus"]) == 0

    local = _train_twice(tmp_path / "corpus", tmp_path / "run", tmp_path / "cache_a")
    remote = _train_twice(f"{gcs_bucket}/corpus", f"{gcs_bucket}/run", tmp_path / "cache_b")
    assert sorted(local[0]) == [1, 2, 3, 4]
    assert local == remote
    assert not list((tmp_path / "cache_b").rglob("*.bin")), "nothing is tokenised or copied at train time"

    with pytest.raises(ConfigError, match="model.vocab_size=200 is smaller"):
        cfg = tiny_config("versatile", {"data.path": str(tmp_path / "corpus"), "model.vocab_size": 200})
        trainer.train(cfg, tmp_path / "small_vocab", progress=False)
