"""Sources (vffn_jax/data/sources.py, read through token_cache.split_tokens) on gs:// paths, a real
fake-gcs-server on 127.0.0.1: the same tokens and batches as the same files on a local path, globs, tokenizer
JSON, TFDS directories, change detection and clear errors."""
import json

import numpy as np
import pytest

from tests.unit.data.corpora import held_out
from vffn_jax.data import local_copies, sources, splits, token_cache
from vffn_jax.data import tokenize_corpus as engine
from vffn_jax import storage
from vffn_jax.config import ConfigError, DataConfig
from vffn_jax.data.default_corpus import prepare_default_corpus
from vffn_jax.data.batches import eval_batches, make_batch_iterator
from vffn_jax.data.token_cache import split_tokens
from vffn_jax.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")
DOCS = [f"doc {i}: " + "lorem ipsum dolor sit amet " * (i % 5 + 1) + "ünïcødé ✓\r\nend" for i in range(60)]


def stream(docs, tok=BYTE):
    return [t for d in docs for t in [*tok.encode(d), tok.eos_id]]


def put(root, rel, data):
    """Writes `data` (str or bytes) to root/rel, local or gs://."""
    p = storage.as_path(f"{root}/{rel}")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)


def write_tree(root):
    """The same small corpus under `root`: .jsonl, .json, .txt files (some nested) and a non-document."""
    put(root, "corpus/a.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS[:30]))
    put(root, "corpus/b.json", json.dumps([{"text": d} for d in DOCS[30:40]]))
    for i, d in enumerate(DOCS[40:60]):
        put(root, f"corpus/{'sub/' if i >= 10 else ''}{i:03d}.txt", d)
    put(root, "corpus/sub-x/020.txt", DOCS[0])  # sorts after sub/ like a local path does
    put(root, "corpus/ignored.csv", "not a document")


def cfgs(tmp_path, gcs_root, rel, **kw):
    """(local config, gs:// config) for the same relative path, each with its own cache."""
    local = DataConfig(path=str(tmp_path / "local" / rel), cache_dir=str(tmp_path / "cache-local"), **kw)
    remote = DataConfig(path=f"{gcs_root}/{rel}", cache_dir=str(tmp_path / "cache-gcs"), **kw)
    return local, remote


def train_bpe(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS * 3, trainer)
    tok.save(str(path))
    return path


@pytest.fixture
def trees(tmp_path, gcs_bucket):
    write_tree(tmp_path / "local")
    write_tree(gcs_bucket)
    return gcs_bucket


@pytest.mark.parametrize("rel", ["corpus", "corpus/a.jsonl", "corpus/*.txt", "corpus/**/*.txt", "corpus/*.json*"])
def test_gcs_text_sources_match_local(tmp_path, trees, rel):
    local, remote = cfgs(tmp_path, trees, rel, holdout_fraction=0.2)
    for split in ("train", "validation"):
        a, b = split_tokens(local, split), split_tokens(remote, split)
        assert isinstance(b, np.memmap) and len(a) > 0 and a.tolist() == b.tolist()
    if rel == "corpus":  # every document, in local path order; .txt files are read with universal newlines
        txt = [d.replace("\r\n", "\n") for d in [*DOCS[40:60], DOCS[0]]]
        docs = [*((f"{i:03d}.txt", 0, txt[i]) for i in range(10)), *(("a.jsonl", i, DOCS[i]) for i in range(30)),
                *(("b.json", i, DOCS[30 + i]) for i in range(10)),
                *((f"sub/{i:03d}.txt", 0, txt[i]) for i in range(10, 20)), ("sub-x/020.txt", 0, txt[20])]
        assert split_tokens(remote, "train").tolist() == stream(held_out(docs, 0.2)[0])
    kw = dict(seq_len=16, global_batch=4)
    it_a, it_b = (make_batch_iterator(c, "train", seed=3, **kw) for c in (local, remote))
    assert all(np.array_equal(next(it_a), next(it_b)) for _ in range(5))
    ev_a, ev_b = (eval_batches(c, n_batches=3, **kw) for c in (local, remote))
    assert len(ev_a) == len(ev_b) > 0 and all(np.array_equal(x, y) for x, y in zip(ev_a, ev_b))


def test_gcs_cache_hit_reads_no_documents(tmp_path, trees, monkeypatch):
    _, remote = cfgs(tmp_path, trees, "corpus/a.jsonl", holdout_fraction=0.1)
    first = token_cache.cached_corpus(remote)
    with monkeypatch.context() as m:  # a cache hit lists and stats the objects, nothing more
        m.setattr(sources, "file_docs", lambda *a, **k: pytest.fail("documents read on a cache hit"))
        m.setattr(engine, "tokenize_unit", lambda *a: pytest.fail("re-tokenised despite a cached corpus"))
        assert token_cache.cached_corpus(remote).folder == first.folder
        split_tokens(remote, "train")


def test_gcs_changed_text_object_is_retokenised(tmp_path, gcs_bucket):
    cfg = DataConfig(path=f"{gcs_bucket}/docs.jsonl", cache_dir=str(tmp_path / "cache"), holdout_fraction=0.3)
    put(gcs_bucket, "docs.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS[:20]))
    held = [i for i in range(20) if splits.in_validation("docs.jsonl", i, 0.3)]
    assert held and split_tokens(cfg, "validation").tolist() == stream([DOCS[i] for i in held])
    before = token_cache.cached_corpus(cfg).folder
    put(gcs_bucket, "docs.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS[20:40]))  # same size
    assert split_tokens(cfg, "validation").tolist() == stream([DOCS[20 + i] for i in held])
    assert token_cache.cached_corpus(cfg).folder != before


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_gcs_token_files(tmp_path, gcs_bucket, suffix, monkeypatch):
    tokens = (np.arange(5_000, dtype=np.uint32) * 7 % 50_000).astype(np.uint16)
    local = tmp_path / f"tokens{suffix}"
    np.save(local, tokens.astype(np.int32)) if suffix == ".npy" else tokens.tofile(local)
    put(gcs_bucket, f"tok/tokens{suffix}", local.read_bytes())
    cache = tmp_path / "cache"
    cfg_l = DataConfig(path=str(local), holdout_fraction=0.1, cache_dir=str(tmp_path / "unused"))
    cfg_g = DataConfig(path=f"{gcs_bucket}/tok/tokens{suffix}", holdout_fraction=0.1, cache_dir=str(cache))
    for split in ("train", "validation"):
        a, b = split_tokens(cfg_l, split), split_tokens(cfg_g, split)
        assert isinstance(b, np.memmap) and np.array_equal(a, b)
    assert np.array_equal(np.concatenate([split_tokens(cfg_g, "train"), split_tokens(cfg_g, "validation")]), tokens)
    kw = dict(seq_len=32, global_batch=4, seed=1)
    it_a, it_b = make_batch_iterator(cfg_l, "train", **kw), make_batch_iterator(cfg_g, "train", **kw)
    assert all(np.array_equal(next(it_a), next(it_b)) for _ in range(4))
    ev = [eval_batches(c, seq_len=32, global_batch=2, n_batches=2) for c in (cfg_l, cfg_g)]
    assert all(np.array_equal(x, y) for x, y in zip(*ev))
    copies = sorted((cache / "tokens").iterdir())
    assert [p.suffix for p in copies] == [suffix] and "-gcs-" in copies[0].name  # one local copy, nothing else
    with monkeypatch.context() as m:  # served from the copy
        m.setattr(local_copies, "_copy_object", lambda *a: pytest.fail("copied twice"))
        split_tokens(cfg_g, "train")
    changed = tokens[::-1].copy()  # same size, new generation
    np.save(local, changed.astype(np.int32)) if suffix == ".npy" else changed.tofile(local)
    put(gcs_bucket, f"tok/tokens{suffix}", local.read_bytes())
    assert np.array_equal(split_tokens(cfg_g, "train"), changed[:4_500])
    assert len(list((cache / "tokens").iterdir())) == 2


def test_gcs_tokenizer_json(tmp_path, gcs_bucket):
    path = train_bpe(tmp_path / "bpe.json")
    put(gcs_bucket, "tok/bpe.json", path.read_bytes())
    local, remote = load_tokenizer(str(path)), load_tokenizer(f"{gcs_bucket}/tok/bpe.json")
    assert (remote.name, remote.vocab_size, remote.eos_id) == (local.name, local.vocab_size, local.eos_id)
    assert remote.encode(DOCS[7]) == local.encode(DOCS[7]) and len(local.encode(DOCS[7])) < len(DOCS[7])
    put(gcs_bucket, "docs.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cfg = DataConfig(path=f"{gcs_bucket}/docs.jsonl", tokenizer=f"{gcs_bucket}/tok/bpe.json",
                     cache_dir=str(tmp_path / "cache"), holdout_fraction=0.1)
    assert split_tokens(cfg, "validation").tolist() == stream(
        held_out([("docs.jsonl", i, d) for i, d in enumerate(DOCS)], 0.1)[1], local)
    for missing in (f"{gcs_bucket}/tok/nope.json", "gs://no-such-bucket-vffn/tok.json"):
        with pytest.raises(FileNotFoundError, match="tokenizer file not found: " + missing):
            load_tokenizer(missing)


def test_gcs_tfds_directory(tmp_path, gcs_bucket):
    """The default corpus's TFDS directory copied to a bucket gives the tokens of the local one."""
    local = prepare_default_corpus()  # the session's shared data cache, as is the local side's token cache
    for f in local.iterdir():
        put(gcs_bucket, f"tfds/kjv/{f.name}", f.read_bytes())
    cfg_l = DataConfig(path=str(local))
    cfg_g = DataConfig(path=f"{gcs_bucket}/tfds/kjv", cache_dir=str(tmp_path / "cache-gcs"))
    val = split_tokens(cfg_g, "validation")
    assert np.array_equal(val, split_tokens(cfg_l, "validation")) and (val == BYTE.eos_id).sum() == 23
    with pytest.raises(ConfigError, match="dataset's directory"):
        split_tokens(DataConfig(path=f"tfds:kjv_bible:{gcs_bucket}/tfds", cache_dir=str(tmp_path)), "train")


def test_gcs_missing_bucket_and_no_match(tmp_path, trees):
    cache = str(tmp_path / "cache")
    bad = "gs://no-such-bucket-vffn"
    for spec, problem in [(f"{bad}/corpus", "does not exist"), (f"{bad}/corpus/*.txt", "matches no"),
                          (f"{bad}/tokens.npy", "does not exist")]:
        with pytest.raises(FileNotFoundError) as err:
            split_tokens(DataConfig(path=spec, cache_dir=cache), "train")
        msg = str(err.value)
        assert f"data.path={spec!r} {problem}" in msg and f"bucket {bad} does not exist" in msg
        assert ".jsonl" in msg and "tfds:" in msg  # what data.path accepts
    for spec, problem in [(f"{trees}/nothing/here", "does not exist"), (f"{trees}/corpus/*.md", "matches no .txt"),
                          (f"{trees}/corpus/**/*.parquet", "matches no .txt")]:
        with pytest.raises(FileNotFoundError) as err:
            split_tokens(DataConfig(path=spec, cache_dir=cache), "train")
        assert f"data.path={spec!r} {problem}" in str(err.value) and "bucket" not in str(err.value)
    put(trees, "csv-only/x.csv", "a,b")
    with pytest.raises(FileNotFoundError, match="is a directory without .txt"):
        split_tokens(DataConfig(path=f"{trees}/csv-only", cache_dir=cache), "train")
    with pytest.raises(ConfigError, match="unsupported file type '.csv'"):
        split_tokens(DataConfig(path=f"{trees}/csv-only/x.csv", cache_dir=cache), "train")
    with pytest.raises(ConfigError, match="gs://BUCKET"):
        split_tokens(DataConfig(path="gs://", cache_dir=cache), "train")
