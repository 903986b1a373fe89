"""The manifest of a tokenised corpus: flat token shards plus `manifest.json`, local or on gs://.

`python -m vffn_jax.data tokenize` writes a folder of shards (`<split>-<unit>-<part>.bin`: raw
little-endian uint16 when the vocabulary fits, else uint32; documents concatenated, each followed by
the tokenizer's EOS) and this manifest:

    {"format": "vffn_jax.token_shards", "format_version": 1,
     "tokenizer": {"name": ..., "spec": "olmo"|"byte"|PATH, "sha256": <of its file, null for byte>,
                   "vocab_size": V, "eos_id": E},
     "dtype": "uint16"|"uint32",
     "shards": [{"file": "train-00000-0000.bin", "split": "train", "tokens": T, "documents": D,
                 "sha256": ...}, ...],
     "splits": {"train": {"tokens": ..., "documents": ..., "shards": ...}, ...},
     "source": {...how it was made: inputs, shard_tokens, validation_fraction...}}

Training reads a manifest by `data.path=` the file or its folder; every check here raises ConfigError
or FileNotFoundError naming the file and the fix (train.py turns those into exit 2).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from vffn_jax import storage
from vffn_jax.config import ConfigError

FORMAT = "vffn_jax.token_shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DTYPES = ("uint16", "uint32")


@dataclasses.dataclass(frozen=True)
class Shard:
    file: str  # relative to the manifest's folder
    split: str
    tokens: int
    documents: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    folder: Any  # epath.Path of the folder holding manifest.json and the shards
    tokenizer: dict[str, Any]
    dtype: str
    shards: tuple[Shard, ...]
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def path(self):
        return self.folder / MANIFEST_NAME

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")

    def split_shards(self, split: str) -> list[Shard]:
        return [s for s in self.shards if s.split == split]

    def splits(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in self.shards:
            d = out.setdefault(s.split, {"tokens": 0, "documents": 0, "shards": 0})
            d["tokens"] += s.tokens
            d["documents"] += s.documents
            d["shards"] += 1
        return out

    def to_json(self) -> str:
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": self.tokenizer, "dtype": self.dtype,
               "shards": [dataclasses.asdict(s) for s in self.shards], "splits": self.splits(), "source": self.source}
        return json.dumps(doc, indent=1)


def is_manifest_path(path: str) -> bool:
    """Whether `data.path` names a manifest: the file itself, or a folder holding one."""
    if not path or path.startswith("tfds:"):
        return False
    p = storage.as_path(path)
    if p.name == MANIFEST_NAME:
        return True
    try:
        return (p / MANIFEST_NAME).exists()
    except Exception:  # an unreadable bucket: let the ordinary source resolution report it
        return False


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def read_manifest(path: str, what: str = "data.path") -> Manifest:
    """The manifest at `path` (the manifest file or its folder); errors name the file."""
    p = storage.as_path(path)
    file = p if p.name == MANIFEST_NAME else p / MANIFEST_NAME
    if not file.exists():
        raise FileNotFoundError(f"{what}={path}: {file} not found; make one with "
                                "`python -m vffn_jax.data tokenize --input ... --output FOLDER`")
    try:
        doc = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); re-run the tokenize command to rewrite it") from None
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{file}: format {doc.get('format')!r} version {doc.get('format_version')!r}; this "
                          f"vffn_jax reads {FORMAT!r} version {FORMAT_VERSION}: re-tokenise with this version")
    try:
        shards = tuple(Shard(**s) for s in doc["shards"])
        tokenizer, dtype = dict(doc["tokenizer"]), doc["dtype"]
        for key in ("name", "vocab_size", "eos_id"):
            tokenizer[key]  # noqa: B018 - presence check
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{file}: missing or malformed field {e}; re-run the tokenize command") from None
    if dtype not in DTYPES:
        raise ConfigError(f"{file}: dtype {dtype!r} is not one of {DTYPES}")
    if not shards:
        raise ConfigError(f"{file} lists no shards: the input was empty")
    return Manifest(file.parent, tokenizer, dtype, shards, doc.get("source", {}))


def check_tokenizer(m: Manifest, tok, model_vocab_size: int | None = None) -> None:
    """ConfigError naming both values when the run's tokenizer (`data.tokenizer`) or model vocabulary
    disagrees with the one the corpus was tokenised with."""
    t = m.tokenizer
    where = f"{m.path} was tokenised with {t.get('spec') or t['name']!r}"
    if t.get("sha256") != getattr(tok, "sha256", None) or t["name"] != tok.name:
        raise ConfigError(f"{where} (name {t['name']}, sha256 {t.get('sha256')}) but data.tokenizer gives "
                          f"{tok.name} (sha256 {getattr(tok, 'sha256', None)}); set data.tokenizer to the file "
                          "the corpus was tokenised with, or re-tokenise")
    if t["vocab_size"] != tok.vocab_size:
        raise ConfigError(f"{where}: vocab size {t['vocab_size']} in the manifest, {tok.vocab_size} for "
                          "data.tokenizer; use the same tokenizer file")
    if t["eos_id"] != tok.eos_id:
        raise ConfigError(f"{where}: EOS id {t['eos_id']} in the manifest, {tok.eos_id} for data.tokenizer; "
                          "use the same tokenizer file")
    if model_vocab_size is not None and model_vocab_size < t["vocab_size"]:
        raise ConfigError(f"model.vocab_size={model_vocab_size} is smaller than the vocabulary of {m.path} "
                          f"({t['vocab_size']} tokens); raise model.vocab_size to at least {t['vocab_size']}")
