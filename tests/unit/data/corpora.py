"""Small documents and tokenizers shared by the data tests (tokenizer, token cache, pipeline)."""
from __future__ import annotations

import json

from vffn_jax.config import DataConfig
from vffn_jax.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")
DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) + "ünïcødé ✓" for i in range(100)]


def stream(docs, tok=BYTE):
    """The token stream of `docs`: each document's tokens followed by EOS."""
    return [t for d in docs for t in [*tok.encode(d), tok.eos_id]]


def held_out(keys_and_docs, fraction):
    """(train documents, validation documents) of (file key, index, document) triples by the per-document
    hash of vffn_jax/data/splits.py, in input order."""
    from vffn_jax.data import splits

    train, val = [], []
    for key, i, doc in keys_and_docs:
        (val if splits.in_validation(key, i, fraction) else train).append(doc)
    return train, val


def take(it, n):
    return [next(it) for _ in range(n)]


def write_jsonl(tmp_path) -> DataConfig:
    """DOCS as a .jsonl file; its DataConfig (10% held out) with a cache of its own under `tmp_path`."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), holdout_fraction=0.1)


def train_bpe(tmp_path, special="<|endoftext|>"):
    """A byte-level BPE tokenizer JSON (vocabulary 400) trained on DOCS; `special` is its only special token."""
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


# --------------------------------------------------------------------------- token-shard corpora

BYTE_TOK = {"name": "byte", "spec": "byte", "sha256": None, "vocab_size": 257, "eos_id": 256}


def write_corpus(folder, splits: dict, *, dtype="uint16", tokenizer=BYTE_TOK):
    """Writes shards `<split>-<i>.bin` and manifest.json into `folder` (local path or gs:// URL); `splits` maps
    a split to its shards' token arrays. Returns the Manifest."""
    import hashlib

    import numpy as np

    from vffn_jax import storage
    from vffn_jax.data.manifest import Manifest, Shard

    root = storage.as_path(str(folder))
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, arrays in splits.items():
        for i, a in enumerate(arrays):
            raw = np.asarray(a).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
            name = f"{split}-{i:04d}.bin"
            (root / name).write_bytes(raw)
            shards.append(Shard(name, split, len(a), 1, hashlib.sha256(raw).hexdigest()))
    m = Manifest(root, dict(tokenizer), dtype, tuple(shards))
    (root / "manifest.json").write_text(m.to_json())
    return m


def shard_arrays(rng, lengths, lo=0, hi=256):
    """Random token arrays of the given lengths, values in [lo, hi)."""
    return [rng.integers(lo, hi, n) for n in lengths]
