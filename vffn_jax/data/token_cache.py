"""Raw `data.path` sources -> one cached token stream per split (`token_split`).

Sources (`DataConfig.path`):
  ""                          the default corpus (vffn_jax/data/corpus.py): a local TFDS dataset
  tfds:NAME[:DATA_DIR]        a TFDS dataset prepared locally (field `text_field`); or a path to a TFDS
                              dataset directory (the one holding dataset_info.json)
  dir, glob or file           documents read by vffn_jax/data/sources.py: .txt (one per file), .jsonl (one per
                              line), .json, .jsonl.gz / .json.gz, .parquet (column `text_field`)
  .npy / .bin                 pre-tokenised ids (1-D integer .npy; .bin = raw uint16, nanoGPT-style)

Every path may also be `gs://BUCKET/...` (read through `vffn_jax.storage`, i.e. etils.epath over gcsfs):
  - document files (dir = every object under the prefix, glob = gcsfs glob, `**` allowed, or one object) are
    read through epath and tokenised into the local token cache like local files; the cache key holds
    each object's name, size and generation, so a rewritten object is tokenised again.
  - .npy / .bin token files cannot be memory-mapped from a bucket: the object is copied once into the
    token cache (`{stem}-gcs-{digest}{suffix}`, digest of its name, size and generation; written
    atomically) and that copy is memory-mapped.
  - a TFDS dataset directory is copied once into `cache_root()/tfds-gcs/` (ArrayRecord readers need
    local files) and read from there; `tfds:NAME:gs://...` is not supported.
A missing bucket or a path that matches nothing raises FileNotFoundError/ConfigError naming data.path.

Every document is followed by the tokenizer's EOS. Sources without a "validation" split hold out their
last `holdout_fraction` of documents (of tokens for .npy/.bin). Documents are tokenised once into a
token-shard corpus in the cache, `cache_root()/tokens/{label}-{tokenizer}-{digest}/` = manifest.json + one
shard per split (`train-00000-0000.bin`, `validation-00000-0000.bin`), the format `python -m vffn_jax.data
tokenize` writes, so training reads raw sources and pre-tokenised corpora the same way (vffn_jax/data/shards.py).
The digest is of (CACHE_FORMAT, the inputs' identities, the tokenizer, holdout_fraction): a cache of an older
format is never read, the corpus is tokenised again (the old files can be deleted).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds

from vffn_jax import storage
from vffn_jax.config import ConfigError, DataConfig
from vffn_jax.data import manifest as manifest_lib
from vffn_jax.data import sources
from vffn_jax.data.corpus import cache_root, prepare_default_corpus
from vffn_jax.data.sources import SPLITS
from vffn_jax.data.tokenizer import Tokenizer, load_tokenizer

TOKEN_SUFFIXES = (".npy", ".bin")
ACCEPTED = ('data.path accepts "" (default corpus), tfds:NAME[:DATA_DIR], a TFDS dataset directory, '
            f"a directory / glob / file of {', '.join(sources.SUFFIXES)} documents, a .npy / .bin token file, "
            "or a token-shard folder (manifest.json)")
CACHE_FORMAT = 2  # bump when the token stream layout or the cache key changes (2: one reader, sources.py)
CHUNK_DOCS = 1024  # documents per encode_batch call
COPY_CHUNK = 16 << 20  # bytes per read when copying a gs:// object into the cache
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


def _digest(key) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _label(cfg: DataConfig) -> str:
    return f"data.path={cfg.path!r}"


# --------------------------------------------------------------------------- documents of a source


def _chunked(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


@dataclasses.dataclass
class _TfdsDocs:
    """Documents of a prepared TFDS dataset, read through tfds data sources + grain."""

    builder: tfds.core.DatasetBuilder
    field: str
    origin: dict | None = None  # identity of the gs:// directory this local copy came from

    @property
    def label(self) -> str:
        return self.builder.name

    def identity(self) -> dict:
        if self.origin is not None:
            return {**self.origin, "field": self.field}
        root = Path(str(self.builder.data_dir))
        files = [(str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns) for p in sorted(root.iterdir())]
        return {"tfds": str(root), "files": files, "field": self.field}

    def split_sizes(self) -> dict[str, int]:
        return sources.tfds_splits(self.builder)

    def chunks(self, split: str, start: int, stop: int) -> Iterator[list[str]]:
        where = f"{self.builder.data_dir} split {split}"
        ds = grain.MapDataset.source(self.builder.as_data_source(split))[start:stop]
        ds = ds.map(functools.partial(sources.record_text, where=where, field=self.field)).batch(CHUNK_DOCS, batch_fn=list)
        return iter(ds.to_iter_dataset(_READ))


@dataclasses.dataclass
class _FileDocs:
    """Documents of local or gs:// files (sources.file_docs); `counts` only on a cache miss."""

    files: list[sources.InputFile]
    field: str
    label: str

    def identity(self) -> dict:
        return {"files": [f.stat() for f in self.files], "field": self.field}

    @functools.cached_property
    def counts(self) -> list[int]:
        return [self._count(f.path, self.field) for f in self.files]

    def split_sizes(self) -> dict[str, int]:
        return {"train": sum(self.counts)}

    def chunks(self, split: str, start: int, stop: int) -> Iterator[list[str]]:
        return _chunked(itertools.islice(self._docs_from(start), stop - start), CHUNK_DOCS)

    def _docs_from(self, start: int) -> Iterator[str]:
        seen = 0
        for f, n in zip(self.files, self.counts):
            if seen + n > start:  # files before `start` are counted, not parsed
                yield from itertools.islice(sources.file_docs(f.path, self.field), max(start - seen, 0), None)
            seen += n

    _count = staticmethod(sources.count_docs)


def _file_source(cfg: DataConfig, files: list[sources.InputFile]) -> _FileDocs:
    spec = cfg.path.rstrip("/")
    name = spec.rsplit("/", 1)[-1]
    if glob.has_magic(spec):
        label = sources.glob_root(spec).rstrip("/").rsplit("/", 1)[-1] or "glob"
    elif len(files) == 1 and files[0].path.rstrip("/").endswith(name) and sources.suffix(name):
        label = name[:-len(sources.suffix(name))]
    else:
        label = name or "files"
    return _FileDocs(files, cfg.text_field, label=label)


# --------------------------------------------------------------------------- gs:// sources


def _write_atomically(path: Path, chunks: Iterable[np.ndarray | bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                chunk.tofile(f) if isinstance(chunk, np.ndarray) else f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_object(obj, dest: Path) -> None:
    """Copies a gs:// object to the local file `dest`, atomically."""
    with obj.open("rb") as src:
        _write_atomically(dest, iter(functools.partial(src.read, COPY_CHUNK), b""))


def _gcs_stat(name: str, info: dict) -> tuple[str, int, str]:
    return (storage.GCS_PREFIX + name.removeprefix(storage.GCS_PREFIX), int(info["size"]), sources.gcs_version(info))


def _fetch_token_file(obj, info: dict, cache_dir: str) -> Path:
    """The local copy of a gs:// .npy/.bin object in the token cache, copied on first use (or when the
    object changed: its generation is part of the name)."""
    dest = cache_root(cache_dir) / "tokens" / f"{obj.stem}-gcs-{_digest({'object': _gcs_stat(str(obj), info)})}{obj.suffix}"
    if not dest.exists():
        _copy_object(obj, dest)
    return dest


def _fetch_tfds_dir(root, objects: dict[str, dict], cache_dir: str) -> tuple[Path, list]:
    """A local copy of the TFDS dataset directory `root` (ArrayRecord reads local files); and its stats."""
    prefix = str(root).removeprefix(storage.GCS_PREFIX).rstrip("/") + "/"
    names = sorted(n for n, i in objects.items() if i.get("type") == "file" and not n.endswith("/"))
    stats = [_gcs_stat(n, objects[n]) for n in names]
    dest = cache_root(cache_dir) / "tfds-gcs" / f"{root.name}-{_digest(stats)}"
    if not (dest / "dataset_info.json").is_file():
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            for (url, _, _), name in zip(stats, names):
                _copy_object(storage.as_path(url), tmp / name.removeprefix(prefix))
            try:
                os.rename(tmp, dest)
            except OSError:  # another process put its complete copy there first
                if not (dest / "dataset_info.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, stats


def _open_gcs_source(cfg: DataConfig) -> "_TfdsDocs | _FileDocs | np.memmap":
    """`_open_source` for a gs:// data.path: listings and metadata through gcsfs, reads through epath."""
    spec, label = cfg.path, _label(cfg)
    root_url, objects, one = sources.gcs_listing(spec, label, ACCEPTED)
    root = storage.as_path(spec)
    try:
        if one is None and not glob.has_magic(spec):
            key = str(root).removeprefix(storage.GCS_PREFIX).rstrip("/") + "/dataset_info.json"
            if key in objects:
                local, stats = _fetch_tfds_dir(root, objects, cfg.cache_dir)
                return _TfdsDocs(tfds.builder_from_directory(local), cfg.text_field,
                                 origin={"tfds": str(root), "files": stats})
        if one is not None and root.suffix in TOKEN_SUFFIXES:
            return _load_token_file(_fetch_token_file(root, one, cfg.cache_dir), spec)
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types; all mean "cannot read"
        raise sources.gcs_read_error(spec, label, e) from None
    if one is not None and not sources.suffix(spec):
        raise ConfigError(f"{label}: unsupported file type {root.suffix!r}; {ACCEPTED}")
    return _file_source(cfg, sources.gcs_files(spec, root_url, objects, label, ACCEPTED))


def _load_token_file(path: Path, spec: str) -> np.memmap:
    """A memmap of a local .npy (1-D integer) or .bin (raw uint16) token file."""
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"{spec}: expected a 1-D integer array of token ids, got {arr.dtype}{list(arr.shape)}")
        return arr
    return np.memmap(path, dtype=np.uint16, mode="r")


def open_source(cfg: DataConfig) -> _TfdsDocs | _FileDocs | np.memmap:
    """The documents of cfg.path, or its whole token array for pre-tokenised files."""
    spec = cfg.path
    if not spec:
        return _TfdsDocs(tfds.builder_from_directory(prepare_default_corpus(cfg.cache_dir)), "text")
    if spec.startswith("tfds:"):
        return _TfdsDocs(sources.tfds_builder(spec, _label(cfg)), cfg.text_field)
    if storage.is_gcs(spec):
        return _open_gcs_source(cfg)
    path = Path(spec).expanduser()
    if not glob.has_magic(spec):
        if sources.is_tfds_dir(spec):
            return _TfdsDocs(tfds.builder_from_directory(path), cfg.text_field)
        if path.is_file() and path.suffix in TOKEN_SUFFIXES:
            return _load_token_file(path, str(path))
        if path.is_file() and not sources.suffix(path.name):
            raise ConfigError(f"{_label(cfg)}: unsupported file type {path.suffix!r}; {ACCEPTED}")
    return _file_source(cfg, sources.local_files(spec, _label(cfg), ACCEPTED))


# --------------------------------------------------------------------------- token splits


def split_range(sizes: dict[str, int], split: str, holdout: float, what: str,
                 unit: str = "documents") -> tuple[str, int, int]:
    """(source split, start, stop): the source's own validation split, else the last `holdout` of train."""
    if "validation" in sizes and "train" in sizes:
        return split, 0, sizes[split]
    if "train" not in sizes:
        raise ConfigError(f"{what} has no 'train' split (splits: {sorted(sizes)})")
    n = sizes["train"]
    n_val = max(1, round(n * holdout)) if holdout > 0 else 0
    if split == "validation" and n_val == 0:
        raise ConfigError(f"{what} has no validation split and data.holdout_fraction=0; set it > 0")
    if n - n_val < 1:
        raise ConfigError(f"{what} has {n} {unit}: too few to hold out {n_val} for validation "
                         "and keep some for training; add data or lower data.holdout_fraction")
    return ("train", 0, n - n_val) if split == "train" else ("train", n - n_val, n)


def _token_view(tokens: np.memmap, start: int, stop: int) -> np.memmap:
    """A memmap of tokens[start:stop] whose filename/offset describe exactly that range."""
    return np.memmap(tokens.filename, dtype=tokens.dtype, mode="r",
                     offset=tokens.offset + start * tokens.dtype.itemsize, shape=(stop - start,))


def _token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)


def _encode_chunk(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    ids = tok.encode_batch(texts)
    total = sum(map(len, ids)) + len(ids)
    stream = itertools.chain.from_iterable(itertools.chain(x, (tok.eos_id,)) for x in ids)
    return np.fromiter(stream, dtype=dtype, count=total)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: choose one of {SPLITS}")


def _what(cfg: DataConfig) -> str:
    return _label(cfg) if cfg.path else "the default corpus"


def _build_cache(cfg: DataConfig, source, tok: Tokenizer, folder: Path) -> None:
    """Tokenises every split of `source` into `folder`: one shard per split + manifest.json (written last; the
    folder appears complete or not at all)."""
    dtype = manifest_lib.dtype_for(tok.vocab_size)
    what, holdout = _what(cfg), cfg.holdout_fraction
    sizes = source.split_sizes()  # a full read of text files to count documents: only on a cache miss
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        shards = []
        for split in SPLITS:
            if split == "validation" and holdout <= 0 and "validation" not in sizes:
                continue  # no validation split: token_split("validation") says so
            src_split, start, stop = split_range(sizes, split, holdout, what)
            if stop <= start:
                raise ConfigError(f"split {split!r} of {what} is empty")
            name, sha, n = f"{split}-00000-0000.bin", hashlib.sha256(), 0
            with (tmp / name).open("wb") as f:
                for texts in source.chunks(src_split, start, stop):
                    data = _encode_chunk(tok, texts, np.dtype(dtype)).tobytes()
                    f.write(data)
                    sha.update(data)
                    n += len(data) // np.dtype(dtype).itemsize
            shards.append(manifest_lib.Shard(name, split, n, stop - start, sha.hexdigest()))
        tok_id = {"name": tok.name, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                  "spec": cfg.tokenizer}
        man = manifest_lib.Manifest(folder, tok_id, dtype, tuple(shards),
                                    {"cache_of": cfg.path, "holdout_fraction": holdout, "format": CACHE_FORMAT})
        (tmp / manifest_lib.MANIFEST_NAME).write_text(man.to_json())
        try:
            os.rename(tmp, folder)
        except OSError:  # another process put its complete copy there first
            if not (folder / manifest_lib.MANIFEST_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_corpus(cfg: DataConfig) -> manifest_lib.Manifest | np.memmap:
    """data.path's documents tokenised once into a token-shard corpus in the cache (manifest.json + one shard
    per split, read like any pre-tokenised corpus), keyed by the inputs, the tokenizer and holdout_fraction;
    or the whole token array of a .npy / .bin file."""
    if cfg.mixture or manifest_lib.is_manifest_path(cfg.path):
        raise ConfigError(f"data.path={cfg.path!r} / data.mixture={cfg.mixture!r} names token shards (manifest.json): "
                          "they are read in place by make_batch_iterator / eval_batches (shard_sources), "
                          "not through the token cache")
    source = open_source(cfg)
    if isinstance(source, np.memmap):
        return source
    tok = load_tokenizer(cfg.tokenizer)
    key = {"format": CACHE_FORMAT, "source": source.identity(), "tokenizer": tok.name,
           "holdout_fraction": cfg.holdout_fraction}
    folder = cache_root(cfg.cache_dir) / "tokens" / f"{source.label}-{tok.name}-{_digest(key)}"
    if not (folder / manifest_lib.MANIFEST_NAME).is_file():
        _build_cache(cfg, source, tok, folder)
    return manifest_lib.read_manifest(str(folder), "the token cache of data.path")


def split_shards(cfg: DataConfig, m: manifest_lib.Manifest, split: str) -> list[manifest_lib.Shard]:
    """The shards of `split` of a cached corpus; ConfigError when it has none."""
    shards = m.split_shards(split)
    if not shards:
        raise ConfigError(f"{_what(cfg)} has no validation split and data.holdout_fraction=0; set it > 0")
    return shards


def token_split(cfg: DataConfig, split: str) -> np.memmap:
    """All documents of `split`, tokenised and concatenated, each followed by EOS (cached on disk)."""
    check_split(split)
    corpus = cached_corpus(cfg)
    if isinstance(corpus, np.memmap):
        _, start, stop = split_range({"train": len(corpus)}, split, cfg.holdout_fraction, cfg.path, "tokens")
        return _token_view(corpus, start, stop)
    (shard,) = split_shards(cfg, corpus, split)
    return np.memmap(corpus.folder / shard.file, dtype=np.dtype(corpus.dtype), mode="r")
