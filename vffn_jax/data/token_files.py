"""`data.path` = a pre-tokenised token file: a 1-D integer `.npy`, or a `.bin` of raw uint16 ids (nanoGPT's).

Memory-mapped where it lies; a gs:// object is copied once into the token cache first (a bucket cannot be
memory-mapped; the copy's name holds the object's generation). A token file has no document boundaries, so
its validation split is its last data.holdout_fraction of tokens (vffn_jax/data/splits.py, `tail_range`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vffn_jax import storage
from vffn_jax.config import ConfigError, DataConfig
from vffn_jax.data import local_copies, sources, splits

TOKEN_SUFFIXES = (".npy", ".bin")


def is_token_file(path: str) -> bool:
    return bool(path) and not path.startswith("tfds:") and path.lower().endswith(TOKEN_SUFFIXES)


def _load(path: Path, spec: str) -> np.memmap:
    if not path.is_file():
        raise FileNotFoundError(f"data.path={spec!r} does not exist; {sources.DATA_PATH_ACCEPTS}")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise ConfigError(f"data.path={spec}: not a readable .npy file ({e}); write it with numpy.save") from None
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"{spec}: expected a 1-D integer array of token ids, got {arr.dtype}{list(arr.shape)}")
        return arr
    return np.memmap(path, dtype=np.uint16, mode="r")


def open_tokens(cfg: DataConfig) -> np.memmap:
    """The whole token array of data.path (local, or the cached copy of a gs:// object)."""
    if not storage.is_gcs(cfg.path):
        return _load(Path(cfg.path).expanduser(), cfg.path)
    label = f"data.path={cfg.path!r}"
    _, _, info = sources.gcs_listing(cfg.path, label, sources.DATA_PATH_ACCEPTS)
    if info is None:
        raise ConfigError(f"{label} is a folder, not a .npy / .bin token file")
    try:
        local = local_copies.copy_into_cache(cfg.path, info, cfg.cache_dir)
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types; all mean "cannot read"
        raise sources.gcs_read_error(cfg.path, label, e) from None
    return _load(local, cfg.path)


def split_view(cfg: DataConfig, split: str) -> np.memmap:
    """A memmap of `split`'s tokens (the last data.holdout_fraction are validation)."""
    tokens = open_tokens(cfg)
    start, stop = splits.tail_range(len(tokens), split, cfg.holdout_fraction, f"data.path={cfg.path!r}", "tokens")
    return np.memmap(tokens.filename, dtype=tokens.dtype, mode="r",
                     offset=tokens.offset + start * tokens.dtype.itemsize, shape=(stop - start,))
