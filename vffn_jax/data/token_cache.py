"""`data.path` = raw documents: the tokenising engine's corpus for them, built once into the local cache.

Raw inputs (`data.path` = "" for the default corpus, tfds:NAME[:DATA_DIR], a TFDS dataset directory, or a
directory / glob / file of .txt, .jsonl, .json, .jsonl.gz, .json.gz, .parquet documents; local or gs://) go
through the same engine as `vffn-tokenize` (vffn_jax/data/tokenize_corpus.py) with the same defaults and
`--validation-fraction` = data.holdout_fraction, so the cache holds exactly the shards and manifest that
`vffn-tokenize --input <data.path> --validation-fraction <data.holdout_fraction>` writes, and training reads it
like any token-shard corpus (vffn_jax/data/batches.py): the same held-out documents either way.

The cache folder is `cache_root()/tokens/{label}-{tokenizer}-{digest}/`, the digest of (CACHE_FORMAT, every
input file's identity: path, size, mtime or GCS generation; the tokenizer, text field, held-out fraction and
unit sizes). It is built in a temporary folder and renamed into place, so it appears complete or not at all,
and a cache of another format is never read (the corpus is tokenised again; old folders can be deleted).
`data.tokenize_workers` processes tokenise it (default 1: in the training process).
"""
from __future__ import annotations

import os
import shutil
import uuid

import numpy as np

from vffn_jax.config import ConfigError, DataConfig
from vffn_jax.data import manifest as manifest_lib
from vffn_jax.data import sources, token_files
from vffn_jax.data import tokenize_corpus as engine
from vffn_jax.data.cache_dir import cache_key, cache_root
from vffn_jax.data.default_corpus import prepare_default_corpus

CACHE_FORMAT = 3  # bump when the cache layout or key changes (3: the tokenize engine, its held-out hash)


def describe(cfg: DataConfig) -> str:
    return f"data.path={cfg.path!r}" if cfg.path else "the default corpus"


def cached_corpus(cfg: DataConfig, *, quiet: bool = False) -> manifest_lib.Manifest:
    """The manifest of data.path's documents, tokenised by the engine into the cache on first use."""
    if cfg.mixture or manifest_lib.is_manifest_path(cfg.path):
        raise ConfigError(f"data.path={cfg.path!r} / data.mixture={cfg.mixture!r} names token shards (manifest.json): "
                          "they are read in place, not through the token cache")
    what = describe(cfg)
    spec = cfg.path or str(prepare_default_corpus(cfg.cache_dir))
    inputs = engine.find_units(spec, what=what, cache_dir=cfg.cache_dir, accepted=sources.DATA_PATH_ACCEPTS)
    tok = engine.load_tokenizer_for(cfg.tokenizer, "data.tokenizer")
    key = {"format": CACHE_FORMAT, "units": [u.identity for u in inputs.units], "tokenizer": tok.name,
           "holdout_fraction": None if inputs.own_validation else cfg.holdout_fraction, "text_field": cfg.text_field,
           "unit_bytes": engine.DEFAULT_UNIT_BYTES, "docs_per_unit": engine.DEFAULT_DOCS_PER_UNIT}
    folder = cache_root(cfg.cache_dir) / "tokens" / f"{inputs.label}-{tok.name}-{cache_key(key)}"
    if not (folder / manifest_lib.MANIFEST_NAME).is_file():
        _build(cfg, inputs, folder, quiet)
    return manifest_lib.read_manifest(str(folder), f"the token cache of {what}")


def _build(cfg: DataConfig, inputs: engine.Inputs, folder, quiet: bool) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        report = engine.write_corpus(inputs, str(tmp), cfg.tokenizer, workers=cfg.tokenize_workers,
                                     validation_fraction=cfg.holdout_fraction, text_field=cfg.text_field,
                                     quiet=True, hint="set data.text_field")
        # The manifest names no folder, so the renamed folder is complete as it stands.
        try:
            os.rename(tmp, folder)
        except OSError:  # another process put its complete copy there first
            if not (folder / manifest_lib.MANIFEST_NAME).is_file():
                raise
        if not quiet:
            print(f"data: {report.replace(str(tmp), str(folder))}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def split_tokens(cfg: DataConfig, split: str) -> np.ndarray:
    """All tokens of `split` of data.path (raw documents through the cache, or a .npy / .bin file), in order:
    for inspection and tests; training reads windows of the shards (vffn_jax/data/batches.py)."""
    if token_files.is_token_file(cfg.path):
        return token_files.split_view(cfg, split)
    m = cached_corpus(cfg, quiet=True)
    shards = m.split_shards(split)
    if not shards:
        raise ConfigError(f"{describe(cfg)} holds no {split} documents; raise data.holdout_fraction")
    parts = [np.memmap(m.folder / s.file, dtype=m.np_dtype, mode="r") for s in shards]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
