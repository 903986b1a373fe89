"""Where the data caches live: `data.cache_dir`, else $VFFN_JAX_CACHE_DIR, else ~/.cache/vffn_jax.

Under it: `tfds/` (the default corpus, built once), `tokens/` (raw inputs tokenised by the engine, one
folder per input, tokenizer and settings), `tfds-gcs/` (local copies of gs:// TFDS datasets)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_root(cache_dir: str = "") -> Path:
    """`cache_dir`, else $VFFN_JAX_CACHE_DIR, else ~/.cache/vffn_jax."""
    return Path(cache_dir or os.environ.get("VFFN_JAX_CACHE_DIR") or "~/.cache/vffn_jax").expanduser()


def cache_key(key) -> str:
    """A short digest of a JSON-able key: the part of a cache folder's name that changes with its inputs."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
