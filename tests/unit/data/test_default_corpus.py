"""The default corpus (vffn_jax/data/default_corpus.py): the KJV Bible as a local TFDS dataset, built once in the
cache. Built here from scratch (about a second); the other tests read the session's shared data cache."""
import pytest
import tensorflow_datasets as tfds

from vffn_jax.data import default_corpus as corpus_lib
from vffn_jax.data.cache_dir import cache_root
from vffn_jax.data.default_corpus import prepare_default_corpus


def test_default_corpus(tmp_path, monkeypatch):
    out = prepare_default_corpus(str(tmp_path))
    assert out.parent.parent == cache_root(str(tmp_path)) / "tfds"
    assert sorted(p.name for p in out.glob("*.array_record*")) == [
        "kjv_bible-train.array_record-00000-of-00001", "kjv_bible-validation.array_record-00000-of-00001"]
    train = tfds.data_source("kjv_bible", data_dir=str(tmp_path / "tfds"), split="train")
    val = tfds.builder_from_directory(out).as_data_source("validation")
    assert (len(train), len(val)) == (1166, 23)  # 1,189 chapters, every 50th held out
    assert train[0]["text"].decode().startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert val[0]["title"] == b"Genesis 50"
    monkeypatch.setattr(corpus_lib.KjvBible, "download_and_prepare", lambda self: pytest.fail("prepared twice"))
    assert prepare_default_corpus(str(tmp_path)) == out  # idempotent: the second call builds nothing
