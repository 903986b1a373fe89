"""Data pipeline: tokenizers, sources, splits, caching, packing, shuffling, resume and process sharding."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vffn_jax.data import corpus as corpus_lib
from vffn_jax.data import token_cache
from vffn_jax.config import ConfigError, DataConfig
from vffn_jax.data.manifest import read_manifest
from vffn_jax.data.corpus import prepare_default_corpus
from vffn_jax.data.pipeline import eval_batches, main, make_batch_iterator
from vffn_jax.data.token_cache import token_split
from vffn_jax.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")
DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) + "ünïcødé ✓" for i in range(100)]


def stream(docs, tok=BYTE):
    return [t for d in docs for t in [*tok.encode(d), tok.eos_id]]


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), holdout_fraction=0.1)


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("corpus")
    prepare_default_corpus(str(cache))
    return cache


def train_bpe(tmp_path, special="<|endoftext|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[special] if special else [],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS * 3, trainer)  # ~10 KB of text
    path = tmp_path / f"bpe-{len(special or '')}.json"
    tok.save(str(path))
    return path


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    text = "Héllo, wörld — 日本語 🙂\nend"
    ids = BYTE.encode(text)
    assert (BYTE.vocab_size, BYTE.eos_id) == (257, 256)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert BYTE.decode(ids) == text
    assert BYTE.decode(np.array([*ids, BYTE.eos_id])) == text  # EOS renders as nothing
    assert BYTE.encode_batch([text, ""]) == [ids, []]


def test_hf_tokenizer_json(tmp_path):
    path = train_bpe(tmp_path)
    tok = load_tokenizer(str(path))
    text = "lorem ipsum ünïcødé ✓ unseen wörds"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_id == 0 and tok.eos_id not in ids  # special tokens are never added by encode
    assert 300 < tok.vocab_size <= 400
    assert tok.encode_batch([text, DOCS[3]]) == [ids, tok.encode(DOCS[3])]
    assert load_tokenizer(str(train_bpe(tmp_path, special="</s>"))).eos_id == 0


def test_tokenizer_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "tok.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(str(missing))
    no_eos = train_bpe(tmp_path, special=None)
    with pytest.raises(ValueError, match=str(no_eos)):
        load_tokenizer(str(no_eos))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        load_tokenizer("olmo")


# --------------------------------------------------------------------------- sources and splits


def test_jsonl_holdout_is_last_documents_and_deterministic(jsonl):
    train, val = token_split(jsonl, "train"), token_split(jsonl, "validation")
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert train.tolist() == stream(DOCS[:90]) and val.tolist() == stream(DOCS[90:])
    assert np.array_equal(token_split(jsonl, "validation"), val)


def test_txt_directory_glob_and_json(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, d in enumerate(DOCS[:20]):  # zero-padded names sort in document order, nested dirs included
        (root / ("sub" if i >= 10 else "") / f"{i:03d}.txt").write_text(d)
    (root / "ignored.csv").write_text("not a document")
    cache = str(tmp_path / "cache")
    cfg = DataConfig(path=str(root), cache_dir=cache, holdout_fraction=0.1)
    assert token_split(cfg, "train").tolist() == stream(DOCS[:18])
    assert token_split(cfg, "validation").tolist() == stream(DOCS[18:20])
    globbed = DataConfig(path=str(root / "*.txt"), cache_dir=cache, holdout_fraction=0.1)
    assert token_split(globbed, "train").tolist() == stream(DOCS[:9])
    (tmp_path / "docs.json").write_text(json.dumps([{"body": d} for d in DOCS[:10]]))
    cfg = DataConfig(path=str(tmp_path / "docs.json"), text_field="body", cache_dir=cache, holdout_fraction=0.1)
    assert token_split(cfg, "validation").tolist() == stream(DOCS[9:10])


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_pretokenised_sources(tmp_path, suffix):
    tokens = np.arange(10_000, dtype=np.uint16) % 50_000
    path = tmp_path / f"tokens{suffix}"
    np.save(path, tokens.astype(np.int32)) if suffix == ".npy" else tokens.tofile(path)
    cfg = DataConfig(path=str(path), holdout_fraction=0.05, cache_dir=str(tmp_path / "cache"))
    train, val = token_split(cfg, "train"), token_split(cfg, "validation")
    assert isinstance(train, np.memmap) and (len(train), len(val)) == (9_500, 500)
    assert np.array_equal(np.concatenate([train, val]), tokens)
    batch = next(make_batch_iterator(cfg, "validation", seq_len=16, global_batch=2, seed=0, shuffle=False))
    assert batch.dtype == np.int32 and np.array_equal(batch[0], tokens[9_500:9_517])
    assert not (tmp_path / "cache").exists()  # nothing to tokenise, nothing cached


def test_missing_and_bad_sources(tmp_path):
    missing = tmp_path / "no" / "such" / "data"
    with pytest.raises(FileNotFoundError, match=str(missing)) as err:
        token_split(DataConfig(path=str(missing), cache_dir=str(tmp_path)), "train")
    assert ".jsonl" in str(err.value) and "tfds:" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without .txt"):
        token_split(DataConfig(path=str(tmp_path / "empty"), cache_dir=str(tmp_path)), "train")
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "only doc"}) + "\n")
    with pytest.raises(ValueError, match="too few"):
        token_split(DataConfig(path=str(tmp_path / "one.jsonl"), cache_dir=str(tmp_path)), "train")
    with pytest.raises(ValueError, match="split="):
        token_split(DataConfig(path=str(tmp_path / "one.jsonl"), cache_dir=str(tmp_path)), "test")


def test_split_shorter_than_a_sequence(jsonl):
    with pytest.raises(ValueError, match="fewer than one sequence"):
        make_batch_iterator(jsonl, "validation", seq_len=100_000, global_batch=1, seed=0)


# --------------------------------------------------------------------------- cache


def test_cache_is_reused_and_keyed_by_tokenizer(jsonl, tmp_path, monkeypatch):
    first = token_split(jsonl, "train")
    files = sorted((tmp_path / "cache" / "tokens").iterdir())
    assert len(files) == 1 and not any(".tmp" in f.name for f in files)
    with monkeypatch.context() as m:  # a cache hit must not tokenise again
        m.setattr(token_cache, "_encode_chunk", lambda *a: pytest.fail("re-tokenised despite a cached split"))
        again = token_split(jsonl, "train")
    assert isinstance(again, np.memmap) and again.filename == first.filename
    bpe = dataclasses.replace(jsonl, tokenizer=str(train_bpe(tmp_path)))
    tokens = token_split(bpe, "train")
    assert tokens.filename != first.filename and len(tokens) < len(first)
    assert tokens.tolist() == stream(DOCS[:90], load_tokenizer(bpe.tokenizer))
    other_holdout = dataclasses.replace(jsonl, holdout_fraction=0.2)
    assert token_split(other_holdout, "train").filename not in (first.filename, tokens.filename)


def test_token_cache_is_a_token_shard_corpus(jsonl, tmp_path):
    """Raw sources are tokenised once into manifest.json + one shard per split: the format of
    `python -m vffn_jax.data tokenize`, read the same way; a cache of the old format (one flat file per
    split) is ignored, not read."""
    stale = tmp_path / "cache" / "tokens" / "docs-train-byte-0123456789abcdef.uint16"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x00\x01" * 7)
    train = token_split(jsonl, "train")
    folder = Path(train.filename).parent
    m = read_manifest(str(folder))
    assert {s: (d["documents"], d["shards"]) for s, d in m.splits().items()} == {"train": (90, 1), "validation": (10, 1)}
    assert m.dtype == "uint16" and m.tokenizer["name"] == BYTE.name and train.tolist() == stream(DOCS[:90])
    as_corpus = DataConfig(path=str(folder), cache_dir=jsonl.cache_dir)
    kw = dict(seq_len=32, global_batch=4, seed=1)
    a, b = take(make_batch_iterator(jsonl, "train", **kw), 3), take(make_batch_iterator(as_corpus, "train", **kw), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_failed_tokenisation_leaves_no_cache(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:50]) + json.dumps({"body": "x"}) + "\n")
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), holdout_fraction=0.1)
    with pytest.raises(ConfigError, match="data.text_field"):
        token_split(cfg, "validation")
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []


# --------------------------------------------------------------------------- batches


def test_packing_reproduces_the_token_stream(jsonl):
    seq = 64
    tokens = token_split(jsonl, "train")
    windows = np.concatenate(list(make_batch_iterator(jsonl, "train", seq_len=seq, global_batch=1, seed=0,
                                                      shuffle=False, repeat=False)))
    assert windows.shape == ((len(tokens) - 1) // seq, seq + 1) and windows.dtype == np.int32
    assert np.array_equal(windows[1:, 0], windows[:-1, -1])  # inputs [:, :-1], targets [:, 1:]
    rebuilt = np.concatenate([windows[:, :-1].ravel(), windows[-1:, -1]])
    assert rebuilt.tolist() == stream(DOCS[:90])[:len(rebuilt)]


def test_shuffle_is_seeded_and_reshuffles_each_epoch(jsonl):
    kw = dict(seq_len=64, global_batch=8, shuffle=True)
    n_windows = (len(token_split(jsonl, "train")) - 1) // 64
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
    val = token_split(jsonl, "validation")
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


# --------------------------------------------------------------------------- default corpus


def test_default_corpus(corpus_cache, monkeypatch):
    out = prepare_default_corpus(str(corpus_cache))
    assert sorted(p.name for p in out.glob("*.array_record*")) == [
        "kjv_bible-train.array_record-00000-of-00001", "kjv_bible-validation.array_record-00000-of-00001"]
    train = tfds.data_source("kjv_bible", data_dir=str(corpus_cache / "tfds"), split="train")
    val = tfds.builder_from_directory(out).as_data_source("validation")
    assert (len(train), len(val)) == (1166, 23)  # 1,189 chapters, every 50th held out
    assert train[0]["text"].decode().startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert val[0]["title"] == b"Genesis 50"
    monkeypatch.setattr(corpus_lib.KjvBible, "download_and_prepare", lambda self: pytest.fail("prepared twice"))
    assert prepare_default_corpus(str(corpus_cache)) == out  # idempotent: the second call builds nothing


def test_default_corpus_tokens_and_tfds_paths(corpus_cache):
    cfg = DataConfig(cache_dir=str(corpus_cache))
    train, val = token_split(cfg, "train"), token_split(cfg, "validation")
    assert 3_900_000 < len(train) < 4_200_000 and 80_000 < len(val) < 95_000
    assert (train == BYTE.eos_id).sum() == 1166 and (val == BYTE.eos_id).sum() == 23
    assert BYTE.decode(train[:9]) == "Genesis 1"
    by_name = DataConfig(path=f"tfds:kjv_bible:{corpus_cache / 'tfds'}", cache_dir=str(corpus_cache))
    by_dir = DataConfig(path=str(prepare_default_corpus(str(corpus_cache))), cache_dir=str(corpus_cache))
    assert np.array_equal(token_split(by_name, "validation"), val)
    assert np.array_equal(token_split(by_dir, "validation"), val)
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        token_split(DataConfig(path=f"tfds:no_such_dataset:{corpus_cache}", cache_dir=str(corpus_cache)), "train")


def test_cli(corpus_cache, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--prepare" in capsys.readouterr().out
    assert main(["--prepare", "--cache-dir", str(corpus_cache)]) == 0
    out = capsys.readouterr().out
    assert "kjv_bible" in out and "1,166 documents" in out and "23 documents" in out
