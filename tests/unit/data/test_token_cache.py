"""Raw sources -> one cached token stream per split (vffn_jax/data/token_cache.py, reading through
vffn_jax/data/sources.py): holdout, text/JSON/.npy/.bin sources, errors, the cache (reused, keyed by
tokenizer, a token-shard corpus, nothing left by a failure) and the default corpus's tokens."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tests.unit.data.corpora import BYTE, DOCS, stream, take, train_bpe
from vffn_jax.config import ConfigError, DataConfig
from vffn_jax.data import token_cache
from vffn_jax.data.corpus import cache_root, prepare_default_corpus
from vffn_jax.data.manifest import read_manifest
from vffn_jax.data.pipeline import make_batch_iterator
from vffn_jax.data.token_cache import token_split
from vffn_jax.data.tokenizer import load_tokenizer

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


# --------------------------------------------------------------------------- the default corpus


def test_default_corpus_tokens_and_tfds_paths():
    """The default corpus (the session's shared data cache) by default, by tfds:NAME:DATA_DIR and by its
    dataset directory: the same validation tokens."""
    cfg = DataConfig()
    train, val = token_split(cfg, "train"), token_split(cfg, "validation")
    assert 3_900_000 < len(train) < 4_200_000 and 80_000 < len(val) < 95_000
    assert (train == BYTE.eos_id).sum() == 1166 and (val == BYTE.eos_id).sum() == 23
    assert BYTE.decode(train[:9]) == "Genesis 1"
    by_name = DataConfig(path=f"tfds:kjv_bible:{cache_root() / 'tfds'}")
    by_dir = DataConfig(path=str(prepare_default_corpus()))
    assert np.array_equal(token_split(by_name, "validation"), val)
    assert np.array_equal(token_split(by_dir, "validation"), val)
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        token_split(DataConfig(path=f"tfds:no_such_dataset:{cache_root()}"), "train")
