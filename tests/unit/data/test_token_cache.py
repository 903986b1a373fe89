"""Raw `data.path` sources -> the tokenising engine's corpus in the cache (vffn_jax/data/token_cache.py):
the held-out rule (a per-document hash, or the input's own split), text/JSON/.npy/.bin sources, errors, the
cache (reused, keyed by tokenizer, nothing left by a failure), the same corpus as `vffn-tokenize` writes, and
the default corpus's tokens."""
import dataclasses
import json

import numpy as np
import pytest

from tests.unit.data.corpora import BYTE, DOCS, held_out, stream, take, train_bpe
from vffn_jax.cli import tokenize as tokenize_cli
from vffn_jax.config import ConfigError, DataConfig
from vffn_jax.data import token_cache
from vffn_jax.data import tokenize_corpus as engine
from vffn_jax.data.batches import eval_batches, make_batch_iterator
from vffn_jax.data.cache_dir import cache_root
from vffn_jax.data.default_corpus import prepare_default_corpus
from vffn_jax.data.manifest import read_manifest
from vffn_jax.data.token_cache import split_tokens
from vffn_jax.data.tokenizer import load_tokenizer


# --------------------------------------------------------------------------- sources and splits


def test_jsonl_holdout_is_the_per_document_hash_and_deterministic(jsonl):
    train, val = split_tokens(jsonl, "train"), split_tokens(jsonl, "validation")
    want_train, want_val = held_out([("docs.jsonl", i, d) for i, d in enumerate(DOCS)], 0.1)
    assert 3 <= len(want_val) <= 20  # 10 expected
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert train.tolist() == stream(want_train) and val.tolist() == stream(want_val)
    assert np.array_equal(split_tokens(jsonl, "validation"), val)


def test_held_out_documents_stay_put_when_files_are_added(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for f in range(3):
        (root / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[f::3]))
    cfg = DataConfig(path=str(root), cache_dir=str(tmp_path / "cache"), holdout_fraction=0.2)
    before = split_tokens(cfg, "validation").tolist()
    (root / "a-new.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:40]))
    after = split_tokens(cfg, "validation").tolist()
    _, new_val = held_out([("a-new.jsonl", i, d) for i, d in enumerate(DOCS[:40])], 0.2)
    assert after == stream(new_val) + before  # the new file sorts first; the old held-out documents are unchanged


def test_txt_directory_glob_and_json(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    rels = []
    for i, d in enumerate(DOCS[:20]):  # zero-padded names sort in document order, nested dirs included
        rel = ("sub/" if i >= 10 else "") + f"{i:03d}.txt"
        (root / rel).write_text(d)
        rels.append(rel)
    (root / "ignored.csv").write_text("not a document")
    cache = str(tmp_path / "cache")
    cfg = DataConfig(path=str(root), cache_dir=cache, holdout_fraction=0.3)
    want_train, want_val = held_out([(rel, 0, d) for rel, d in zip(rels, DOCS)], 0.3)
    assert want_val and split_tokens(cfg, "train").tolist() == stream(want_train)
    assert split_tokens(cfg, "validation").tolist() == stream(want_val)
    globbed = DataConfig(path=str(root / "*.txt"), cache_dir=cache, holdout_fraction=0.3)
    assert split_tokens(globbed, "train").tolist() == stream(held_out([(r, 0, d) for r, d in zip(rels[:10], DOCS)],
                                                                      0.3)[0])
    (tmp_path / "docs.json").write_text(json.dumps([{"body": d} for d in DOCS[:10]]))
    cfg = DataConfig(path=str(tmp_path / "docs.json"), text_field="body", cache_dir=cache, holdout_fraction=0.3)
    assert split_tokens(cfg, "validation").tolist() == stream(
        held_out([("docs.json", i, d) for i, d in enumerate(DOCS[:10])], 0.3)[1])


def test_a_validation_folder_is_the_inputs_own_split(tmp_path):
    root = tmp_path / "corpus"
    for split, docs in (("train", DOCS[:80]), ("validation", DOCS[80:])):
        (root / split).mkdir(parents=True)
        (root / split / "x.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(path=str(root), cache_dir=str(tmp_path / "cache"), holdout_fraction=0.5)  # not used
    assert split_tokens(cfg, "train").tolist() == stream(DOCS[:80])
    assert split_tokens(cfg, "validation").tolist() == stream(DOCS[80:])
    assert token_cache.cached_corpus(cfg).source["validation_from"] == "input"


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_pretokenised_sources(tmp_path, suffix):
    tokens = np.arange(10_000, dtype=np.uint16) % 50_000
    path = tmp_path / f"tokens{suffix}"
    np.save(path, tokens.astype(np.int32)) if suffix == ".npy" else tokens.tofile(path)
    cfg = DataConfig(path=str(path), holdout_fraction=0.05, cache_dir=str(tmp_path / "cache"))
    train, val = split_tokens(cfg, "train"), split_tokens(cfg, "validation")
    assert isinstance(train, np.memmap) and (len(train), len(val)) == (9_500, 500)
    assert np.array_equal(np.concatenate([train, val]), tokens)
    batch = next(make_batch_iterator(cfg, "validation", seq_len=16, global_batch=2, seed=0, shuffle=False))
    assert batch.dtype == np.int32 and np.array_equal(batch[0], tokens[9_500:9_517])
    assert not (tmp_path / "cache").exists()  # nothing to tokenise, nothing cached


def test_missing_and_bad_sources(tmp_path):
    missing = tmp_path / "no" / "such" / "data"
    with pytest.raises(FileNotFoundError, match=str(missing)) as err:
        split_tokens(DataConfig(path=str(missing), cache_dir=str(tmp_path)), "train")
    assert ".jsonl" in str(err.value) and "tfds:" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without .txt"):
        split_tokens(DataConfig(path=str(tmp_path / "empty"), cache_dir=str(tmp_path)), "train")
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "only doc"}) + "\n")
    with pytest.raises(ConfigError, match="no train shard holds one sequence"):
        eval_batches(DataConfig(path=str(tmp_path / "one.jsonl"), cache_dir=str(tmp_path)), seq_len=16,
                     global_batch=1, n_batches=1)
    with pytest.raises(ValueError, match="split="):
        make_batch_iterator(DataConfig(path=str(tmp_path / "one.jsonl"), cache_dir=str(tmp_path)), "test",
                            seq_len=4, global_batch=1, seed=0)


# --------------------------------------------------------------------------- cache


def test_cache_is_reused_and_keyed_by_tokenizer(jsonl, tmp_path, monkeypatch):
    first = token_cache.cached_corpus(jsonl)
    folders = sorted((tmp_path / "cache" / "tokens").iterdir())
    assert folders == [first.folder] and not any(".tmp" in f.name for f in folders)
    with monkeypatch.context() as m:  # a cache hit must not tokenise again
        m.setattr(engine, "tokenize_unit", lambda *a: pytest.fail("re-tokenised despite a cached corpus"))
        assert token_cache.cached_corpus(jsonl).folder == first.folder
        split_tokens(jsonl, "train")
    bpe = dataclasses.replace(jsonl, tokenizer=str(train_bpe(tmp_path)))
    tokens = split_tokens(bpe, "train")
    assert token_cache.cached_corpus(bpe).folder != first.folder and len(tokens) < len(split_tokens(jsonl, "train"))
    want_train, _ = held_out([("docs.jsonl", i, d) for i, d in enumerate(DOCS)], 0.1)
    assert tokens.tolist() == stream(want_train, load_tokenizer(bpe.tokenizer))
    other_holdout = dataclasses.replace(jsonl, holdout_fraction=0.2)
    assert token_cache.cached_corpus(other_holdout).folder not in (first.folder,
                                                                   token_cache.cached_corpus(bpe).folder)


def test_raw_input_and_vffn_tokenize_give_the_same_corpus_and_batches(tmp_path):
    """data.path=<raw folder> and data.path=<the folder `vffn-tokenize` writes from it, with
    --validation-fraction = data.holdout_fraction>: the same shards, so the same train and held-out batches.
    A token cache of the old format (one flat file per split) is ignored, not read."""
    stale = tmp_path / "cache" / "tokens" / "docs-train-byte-0123456789abcdef.uint16"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x00\x01" * 7)
    root = tmp_path / "corpus"
    root.mkdir()
    for f in range(3):
        (root / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[f::3] * 3))
    raw = DataConfig(path=str(root), cache_dir=str(tmp_path / "cache"), holdout_fraction=0.1)
    assert tokenize_cli.main(["--input", str(root), "--output", str(tmp_path / "shards"), "--tokenizer", "byte",
                              "--validation-fraction", "0.1", "--quiet"]) == 0
    cached, written = token_cache.cached_corpus(raw), read_manifest(str(tmp_path / "shards"))
    assert cached.shards == written.shards and set(cached.splits()) == {"train", "validation"}
    as_corpus = DataConfig(path=str(tmp_path / "shards"))
    kw = dict(seq_len=32, global_batch=4, seed=1)
    a, b = take(make_batch_iterator(raw, "train", **kw), 3), take(make_batch_iterator(as_corpus, "train", **kw), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    ev = dict(seq_len=32, global_batch=4, n_batches=100)
    a, b = eval_batches(raw, **ev), eval_batches(as_corpus, **ev)
    assert len(a) == len(b) > 2 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_failed_tokenisation_leaves_no_cache(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:50]) + json.dumps({"body": "x"}) + "\n")
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), holdout_fraction=0.1)
    with pytest.raises(ConfigError, match="line 51: record has no field 'text'.*data.text_field"):
        split_tokens(cfg, "validation")
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []


# --------------------------------------------------------------------------- the default corpus


def test_default_corpus_tokens_and_tfds_paths():
    """The default corpus (the session's shared data cache) by default, by tfds:NAME:DATA_DIR and by its
    dataset directory: the same validation tokens, its own split."""
    cfg = DataConfig()
    train, val = split_tokens(cfg, "train"), split_tokens(cfg, "validation")
    assert 3_900_000 < len(train) < 4_200_000 and 80_000 < len(val) < 95_000
    assert (train == BYTE.eos_id).sum() == 1166 and (val == BYTE.eos_id).sum() == 23
    assert BYTE.decode(train[:9]) == "Genesis 1"
    by_name = DataConfig(path=f"tfds:kjv_bible:{cache_root() / 'tfds'}")
    by_dir = DataConfig(path=str(prepare_default_corpus()))
    assert np.array_equal(split_tokens(by_name, "validation"), val)
    assert np.array_equal(split_tokens(by_dir, "validation"), val)
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        split_tokens(DataConfig(path=f"tfds:no_such_dataset:{cache_root()}"), "train")


def test_a_run_on_raw_files_evaluates_the_same_on_the_manifest_vffn_tokenize_writes(tmp_path):
    """Train on a raw .jsonl folder; `vffn-eval` of that run on the folder `vffn-tokenize` writes from the same
    files (--validation-fraction = data.holdout_fraction) gives the training run's own held-out loss."""
    from vffn_jax.cli import eval as eval_cli
    from vffn_jax.testing.cli import call
    from vffn_jax.testing.shapes import tiny_config
    from vffn_jax.train import loop

    root = tmp_path / "corpus"
    root.mkdir()
    for f in range(2):
        (root / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 2))
    cfg = tiny_config("versatile", {"data.path": str(root), "data.holdout_fraction": 0.1, "run.eval_every": 4,
                                    "data.cache_dir": str(tmp_path / "cache")})
    loop.train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r["eval/loss"] for r in rows if "eval/loss" in r][-1]
    assert tokenize_cli.main(["--input", str(root), "--output", str(tmp_path / "shards"), "--tokenizer", "byte",
                              "--validation-fraction", "0.1", "--quiet"]) == 0
    res = call(eval_cli.main, "--workdir", tmp_path / "run", "--json", "--no-plot",
               "--set", f"data.path={tmp_path / 'shards'}")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["loss"] == pytest.approx(trained, rel=1e-6)
