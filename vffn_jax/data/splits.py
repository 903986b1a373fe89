"""Which tokens are held out for evaluation: the one rule every input goes through.

  * A source with its own validation split keeps it: the default corpus and TFDS datasets with a
    "validation" split, and file inputs with a top-level `validation/` folder (every file under it is
    validation, every other file train).
  * Other document sources (files, folders, globs, TFDS datasets without a validation split) hold out each
    document whose hash of (its file's path relative to the input root, or its TFDS split; its index there)
    falls below the fraction (`in_validation`). A document's fate depends on nothing else, so it stays put
    when files are added, when the corpus is cut into other units of work, and whether it reaches training
    through `data.path=FOLDER` or through `vffn-tokenize` and a manifest.
  * Token streams without documents (.npy / .bin token files, and manifests without validation shards) hold
    out their last `fraction` of tokens / windows (`tail_range`).
"""
from __future__ import annotations

import hashlib

from vffn_jax.errors import ConfigError

SPLITS = ("train", "validation")
VALIDATION_FOLDER = "validation"  # files under <input root>/validation/ are a source's own validation split


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: choose one of {SPLITS}")


def in_validation(key: str, index: int, fraction: float) -> bool:
    """Whether document `index` of the file / TFDS split `key` is held out: its hash is below `fraction`."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{key}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < fraction


def own_split_of_file(rel: str) -> str:
    """The split of a file of an input with a `validation/` folder, from its path relative to the root."""
    return "validation" if rel.split("/", 1)[0] == VALIDATION_FOLDER else "train"


def tail_range(n: int, split: str, fraction: float, what: str, unit: str) -> tuple[int, int]:
    """[start, stop) of `split` in a stream of `n` tokens / windows: validation is the last `fraction`."""
    check_split(split)
    n_val = max(1, round(n * fraction)) if fraction > 0 else 0
    if split == "validation" and n_val == 0:
        raise ConfigError(f"{what} has no validation split and data.holdout_fraction=0; set it > 0")
    if n - n_val < 1:
        raise ConfigError(f"{what} has {n} {unit}: too few to hold out {n_val} for validation "
                          "and keep some for training; add data or lower data.holdout_fraction")
    return (0, n - n_val) if split == "train" else (n - n_val, n)
