"""Tokenise a raw text corpus once, in parallel, into flat token shards plus `manifest.json`.

    python -m vffn_jax.data tokenize --input GLOB|DIR|FILE|tfds:NAME[:DATA_DIR] --output DIR|gs://... \\
        --tokenizer olmo|byte|PATH [--shard-tokens N] [--workers P] [--validation-fraction F] [--text-field text]

Inputs (local or gs://): `.txt` (one document per file), `.jsonl` (one record per line, text in
--text-field; `.json`: JSON lines or one list of records), `.jsonl.gz` / `.json.gz` (Dolma: gzipped JSON
lines), `.parquet` (FineWeb: a text column, read a row group batch at a time), a TFDS dataset
(`tfds:NAME[:DATA_DIR]`, or the directory holding its dataset_info.json; splits train and validation).

Design:
  - Units of work. Input files are sorted by path (components, so local and gs:// inputs sort alike); each
    file is one unit. A TFDS split is cut into blocks of --docs-per-unit documents, one unit each. Unit i
    writes its own shards `<split>-<i:05d>-<part:04d>.bin` (documents in order, each followed by EOS; a
    shard holds at most --shard-tokens tokens and a document is only split when it alone exceeds that),
    raw little-endian uint16 when the vocabulary fits in 16 bits, else uint32 (`manifest.dtype_for`).
    Shards are written to a temporary file and renamed (local) or uploaded in one request (gs://), so a
    shard name only ever holds a complete shard.
  - Parallelism: `--workers P` processes (spawned; P=1 tokenises in this process) take units from a queue.
    A unit's shards depend on the unit alone, so the output is byte-identical for every P.
  - Validation split: a document goes to "validation" when a hash of (its unit's key: the input path
    relative to the input root, or the TFDS split; its index in that file/split) is below
    --validation-fraction. A TFDS input with its own "validation" split keeps that split instead.
  - Re-runs: after a unit's shards are written, `<output>/.progress/<unit:05d>.json` records its input's
    identity (path, size, mtime or GCS generation) and its shards (tokens, documents, sha256). A re-run
    with the same flags reuses every unit whose record matches and whose shards exist with the right
    sizes, and tokenises the rest. `<output>/.progress/flags.json` holds the flags the output was made
    with; other flags (tokenizer, --shard-tokens, --validation-fraction, --text-field, --docs-per-unit)
    are refused (exit 2) instead of mixing two corpora.
  - The manifest is written last, once every unit is done: a manifest means a complete corpus. It has no
    timestamps, so it is byte-identical across runs and worker counts.
Errors in the input or the flags print `error: ...` naming the file (and line / field) and exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import posixpath
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

import numpy as np

from vffn_jax.data import manifest as manifest_lib
from vffn_jax import storage
from vffn_jax.config import ConfigError

SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
SPLITS = ("train", "validation")
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_DOCS_PER_UNIT = 100_000  # TFDS documents per unit of work
BATCH_DOCS = 512  # documents per encode_batch call
BATCH_CHARS = 4 << 20  # ... or fewer when they hold this many characters
PARQUET_BATCH_ROWS = 1024
PROGRESS = ".progress"
FLAGS_NAME = "flags.json"
SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<unit>\d{5})-(?P<part>\d{4})\.bin$")
HELP = __doc__.split("\n\n", 2)[2]


class InputError(Exception):
    """A problem with the input or the flags, reported as `error: ...` and exit 2 (picklable across workers)."""


# --------------------------------------------------------------------------- inputs -> units


@dataclasses.dataclass(frozen=True)
class Unit:
    index: int
    kind: str  # "file" | "tfds"
    path: str  # the file (local absolute or gs://), or the TFDS dataset directory
    key: str  # path relative to the input root, or the TFDS split name: feeds the validation hash
    identity: dict  # what the progress record must match to reuse the unit's shards
    size: int = 0  # bytes of the input file (files only)
    split: str = ""  # TFDS split
    start: int = 0  # TFDS documents [start, stop) of the split
    stop: int = 0

    def label(self) -> str:
        return self.key if self.kind == "file" else f"tfds {self.key}[{self.start}:{self.stop}]"


def _suffix(name: str) -> str:
    lower = name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if lower.endswith(s)), "")


def _sort_key(rel: str) -> list[str]:
    return rel.split("/")




def _gcs_version(info: dict) -> str:
    return str(info.get("generation") or info.get("md5Hash") or info.get("etag") or info.get("updated", ""))


def _glob_root(spec: str) -> str:
    """The folder part of a glob before its first wildcard."""
    parts = spec.split("/")
    i = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return "/".join(parts[:i])


def _local_files(spec: str, exclude: str | None) -> tuple[str, list[str]]:
    """(root, files) of a local glob, directory or file; hidden files/folders and `exclude` are skipped."""
    if glob.has_magic(spec):
        root = os.path.abspath(os.path.expanduser(_glob_root(spec) or "."))
        files = [os.path.abspath(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p)]
    else:
        path = os.path.abspath(os.path.expanduser(spec))
        if os.path.isdir(path):
            root, files = path, []
            for d, dirs, names in os.walk(path):
                dirs[:] = [x for x in dirs if not x.startswith(".") and os.path.join(d, x) != exclude]
                files += [os.path.join(d, n) for n in names if not n.startswith(".")]
        elif os.path.isfile(path):
            if not _suffix(path):
                raise InputError(f"--input {spec}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            root, files = os.path.dirname(path), [path]
        else:
            raise InputError(f"--input {spec} does not exist")
    files = [f for f in files if _suffix(f) and not (exclude and f.startswith(exclude + os.sep))]
    return root, files


def _file_units(spec: str, output: str) -> list[Unit]:
    if storage.is_gcs(spec):
        fs = storage.gcs_fs()
        url = str(storage.as_path(spec))
        root = _glob_root(url) if glob.has_magic(spec) else url
        try:
            if glob.has_magic(spec):
                objects = fs.glob(url, detail=True)
            else:
                try:
                    info = fs.info(url)
                except FileNotFoundError:
                    raise InputError(_gcs_missing(fs, spec, "does not exist")) from None
                if info["type"] == "directory":
                    objects = fs.find(url, detail=True)
                    if f"{url.removeprefix(storage.GCS_PREFIX)}/dataset_info.json" in objects:
                        raise InputError(f"--input {spec} is a TFDS dataset directory on gs://, which is not "
                                         "supported (ArrayRecord reads local files); copy it to a local folder")
                else:
                    root, objects = posixpath.dirname(url), {url: info}
        except InputError:
            raise
        except FileNotFoundError:
            objects = {}
        except Exception as e:  # noqa: BLE001 - gcsfs/google-auth raise many types; all mean "cannot read"
            raise InputError(f"--input {spec}: cannot read it ({type(e).__name__}: {_first_line(e)})") from None
        root_rel = root.removeprefix(storage.GCS_PREFIX).rstrip("/")
        found = []
        for name, info in objects.items():
            name = name.removeprefix(storage.GCS_PREFIX)
            if info.get("type") == "file" and _suffix(name):
                rel = name[len(root_rel) + 1:] if name.startswith(root_rel + "/") else posixpath.basename(name)
                if not any(p.startswith(".") for p in rel.split("/")):
                    found.append((rel, storage.GCS_PREFIX + name, int(info["size"]), _gcs_version(info)))
        if not found:
            raise InputError(_gcs_missing(fs, spec, f"matches no {'/'.join(SUFFIXES)} files"))
    else:
        out_local = storage.local_path(output) if not storage.is_gcs(output) else None
        root, files = _local_files(spec, str(out_local) if out_local else None)
        if not files:
            raise InputError(f"--input {spec} matches no {'/'.join(SUFFIXES)} files")
        found = []
        for f in files:
            st = os.stat(f)
            found.append((os.path.relpath(f, root).replace(os.sep, "/"), f, st.st_size, str(st.st_mtime_ns)))
    found.sort(key=lambda t: _sort_key(t[0]))
    return [Unit(i, "file", path, rel, {"path": path, "size": size, "version": version}, size=size)
            for i, (rel, path, size, version) in enumerate(found)]


def _bucket(spec: str) -> str:
    return storage.GCS_PREFIX + spec.removeprefix(storage.GCS_PREFIX).split("/", 1)[0]


def _bucket_exists(fs, spec: str) -> bool:
    try:
        return bool(fs.exists(_bucket(spec).removeprefix(storage.GCS_PREFIX)))
    except Exception:  # noqa: BLE001
        return False


def _gcs_missing(fs, spec: str, problem: str) -> str:
    note = "" if _bucket_exists(fs, spec) else f" (bucket {_bucket(spec)} does not exist or cannot be read)"
    return f"--input {spec} {problem}{note}"


def _tfds_dir(spec: str) -> str:
    """The dataset directory (holding dataset_info.json) of `tfds:NAME[:DATA_DIR]`."""
    import tensorflow_datasets as tfds

    m = re.fullmatch(r"tfds:(?P<name>[^:]+(?::\d+\.\d+\.\d+)?)(?::(?P<dir>.+))?", spec)
    if not m:
        raise InputError(f"--input {spec!r}: expected tfds:NAME[:DATA_DIR] (NAME may carry :VERSION)")
    if m["dir"] and storage.is_gcs(m["dir"]):
        raise InputError(f"--input {spec!r}: a TFDS data_dir on gs:// is not supported; copy the dataset locally")
    data_dir = os.path.abspath(os.path.expanduser(m["dir"])) if m["dir"] else None
    try:
        builder = tfds.builder(m["name"], data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises several registry/lookup error types
        raise InputError(f"--input {spec}: TFDS dataset not found ({type(e).__name__}: {_first_line(e)})") from None
    if not builder.is_prepared():
        raise InputError(f"--input {spec}: TFDS dataset is not prepared under {builder.data_dir}; "
                         "prepare it first (tfds build) or pass its DATA_DIR")
    return str(builder.data_dir)


def _tfds_units(data_dir: str, docs_per_unit: int) -> tuple[list[Unit], dict[str, int], int]:
    """Units of the train/validation splits of the TFDS dataset at `data_dir`; (units, split sizes, bytes)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(data_dir)
    sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
    if "train" not in sizes:
        raise InputError(f"--input {data_dir}: the TFDS dataset has no 'train' split (splits: {sorted(sizes)})")
    ignored = sorted(set(sizes) - set(SPLITS))
    if ignored:
        print(f"note: ignoring TFDS split(s) {ignored} of {data_dir}", file=sys.stderr)
    files = sorted(os.listdir(data_dir))
    stats = [(f, os.path.getsize(os.path.join(data_dir, f)), os.stat(os.path.join(data_dir, f)).st_mtime_ns)
             for f in files if os.path.isfile(os.path.join(data_dir, f))]
    units = []
    for split in [s for s in SPLITS if s in sizes]:
        for start in range(0, sizes[split], docs_per_unit):
            stop = min(start + docs_per_unit, sizes[split])
            units.append(Unit(len(units), "tfds", data_dir, split,
                              {"tfds": data_dir, "split": split, "start": start, "stop": stop, "files": stats},
                              split=split, start=start, stop=stop))
    return units, sizes, sum(s[1] for s in stats)


def find_units(spec: str, output: str, docs_per_unit: int) -> tuple[list[Unit], dict]:
    """The units of work of --input and a summary of the inputs for the manifest's `source`."""
    if spec.startswith("tfds:"):
        data_dir = _tfds_dir(spec)
    elif not storage.is_gcs(spec) and os.path.isfile(os.path.join(os.path.expanduser(spec), "dataset_info.json")):
        data_dir = os.path.abspath(os.path.expanduser(spec))
    else:
        units = _file_units(spec, output)
        return units, {"spec": spec, "count": len(units), "bytes": sum(u.size for u in units)}
    units, sizes, nbytes = _tfds_units(data_dir, docs_per_unit)
    return units, {"spec": spec, "tfds_splits": {s: sizes[s] for s in SPLITS if s in sizes}, "count": len(units),
                   "bytes": nbytes}


# --------------------------------------------------------------------------- documents of a unit


def _text(value, where: str, field: str) -> str:
    if isinstance(value, dict):
        if field not in value:
            raise InputError(f"{where}: record has no field {field!r} (fields: {sorted(value)[:10]}); "
                             "set --text-field")
        value = value[field]
    if value is None:
        raise InputError(f"{where}: field {field!r} is null")
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise InputError(f"{where}: field {field!r} is a {type(value).__name__}, not text")
    return value


def _json_lines(fh: io.BufferedIOBase, where: str, field: str) -> Iterator[str]:
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise InputError(f"{where} line {n}: not valid JSON ({e})") from None
        yield _text(record, f"{where} line {n}", field)


def _parquet_docs(fh, where: str, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fh)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid and others
        raise InputError(f"{where}: not a readable parquet file ({_first_line(e)})") from None
    if field not in pf.schema_arrow.names:
        raise InputError(f"{where}: no column {field!r} (columns: {pf.schema_arrow.names[:10]}); set --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _text(value, f"{where} row {row}", field)


def _starts_list(raw) -> bool:
    head = raw.read(256)
    raw.seek(0)
    return head.lstrip()[:1] == b"["


def _file_docs(unit: Unit, field: str) -> Iterator[str]:
    suffix, where = _suffix(unit.path), unit.path
    with storage.as_path(unit.path).open("rb") as raw:
        if suffix == ".txt":
            yield raw.read().decode("utf-8", errors="replace")
        elif suffix == ".parquet":
            yield from _parquet_docs(raw, where, field)
        elif suffix.endswith(".gz"):
            try:
                yield from _json_lines(gzip.GzipFile(fileobj=raw), where, field)
            except (OSError, EOFError) as e:
                raise InputError(f"{where}: cannot decompress ({e})") from None
        elif suffix == ".json" and _starts_list(raw):  # one JSON list of records
            try:
                records = json.loads(raw.read())
            except ValueError as e:
                raise InputError(f"{where}: not valid JSON ({e})") from None
            for n, record in enumerate(records):
                yield _text(record, f"{where} record {n}", field)
        else:
            yield from _json_lines(raw, where, field)


def _tfds_docs(unit: Unit, field: str) -> Iterator[str]:
    import tensorflow_datasets as tfds

    source = tfds.builder_from_directory(unit.path).as_data_source(unit.split)
    for start in range(unit.start, unit.stop, BATCH_DOCS):
        idx = list(range(start, min(start + BATCH_DOCS, unit.stop)))
        for i, record in zip(idx, source.__getitems__(idx)):
            yield _text(record, f"{unit.path} split {unit.split} record {i}", field)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def in_validation(key: str, index: int, fraction: float) -> bool:
    """Whether document `index` of the file/split `key` is held out: hash below `fraction`."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{key}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < fraction


# --------------------------------------------------------------------------- shards of a unit


class _ShardWriter:
    """Shards `<split>-<unit>-<part>.bin` of one split of one unit, at most `limit` tokens each."""

    def __init__(self, output: str, split: str, unit: int, limit: int, dtype: np.dtype):
        self.output, self.split, self.unit, self.limit, self.dtype = output, split, unit, limit, dtype
        self.gcs = storage.is_gcs(output)
        self.shards: list[dict] = []
        self._fh = None
        self._tmp = ""
        self._tokens = self._docs = 0
        self._sha = hashlib.sha256()

    def _open(self) -> None:
        if self.gcs:
            fd, self._tmp = tempfile.mkstemp(suffix=".bin", prefix="vffn-shard-")
            self._fh = os.fdopen(fd, "wb")
        else:
            self._tmp = os.path.join(self.output, f".{self._name()}.tmp-{uuid.uuid4().hex[:8]}")
            self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close
        self._tokens = self._docs = 0
        self._sha = hashlib.sha256()

    def _name(self) -> str:
        return f"{self.split}-{self.unit:05d}-{len(self.shards):04d}.bin"

    def _write(self, ids: np.ndarray, ends_doc: bool) -> None:
        if self._fh is None:
            self._open()
        data = ids.astype(self.dtype, copy=False).tobytes()
        self._fh.write(data)
        self._sha.update(data)
        self._tokens += len(ids)
        self._docs += ends_doc

    def add(self, ids: np.ndarray) -> None:
        """One document's ids, EOS included."""
        n = len(ids)
        if self._tokens + n <= self.limit:
            self._write(ids, True)
            return
        if n <= self.limit:  # starts a new shard
            self._close()
            self._write(ids, True)
            return
        # Longer than a whole shard: fill the current one, then whole shards, the rest starts the next.
        pos = 0
        while n - pos > self.limit - self._tokens:
            take = self.limit - self._tokens
            if take:
                self._write(ids[pos:pos + take], False)
                pos += take
            self._close()
        self._write(ids[pos:], True)

    def _close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        name = self._name()
        dest = f"{self.output.rstrip('/')}/{name}"
        try:
            if self.gcs:
                storage.gcs_fs().put_file(self._tmp, dest.removeprefix(storage.GCS_PREFIX))
                os.unlink(self._tmp)
            else:
                os.replace(self._tmp, dest)
        except BaseException:
            _unlink_quietly(self._tmp)
            raise
        self.shards.append({"file": name, "split": self.split, "tokens": self._tokens, "documents": self._docs,
                            "sha256": self._sha.hexdigest()})
        self._tokens = self._docs = 0

    def finish(self) -> list[dict]:
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            _unlink_quietly(self._tmp)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _tokenizer(spec: str):
    from vffn_jax.data.tokenizer import load_tokenizer  # cached per process: each worker loads it once

    return load_tokenizer(spec)


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker needs besides the unit (picklable)."""

    output: str
    tokenizer: str
    dtype: str
    shard_tokens: int
    validation_fraction: float  # 0 when the input brings its own validation split
    text_field: str


def tokenize_unit(job: Job, unit: Unit) -> dict:
    """Writes the unit's shards and its progress record; returns the record."""
    tok = _tokenizer(job.tokenizer)
    dtype = np.dtype(job.dtype).newbyteorder("<")
    eos = np.array([tok.eos_id], dtype=np.int64)
    if unit.kind == "tfds":
        docs, first_index = _tfds_docs(unit, job.text_field), unit.start
        fixed_split = unit.split  # the input's own split
    else:
        docs, first_index, fixed_split = _file_docs(unit, job.text_field), 0, None
    writers = {s: _ShardWriter(job.output, s, unit.index, job.shard_tokens, dtype) for s in SPLITS}
    index = first_index
    try:
        for texts in _batches(docs):
            for ids in tok.encode_batch(texts):
                split = fixed_split or ("validation" if in_validation(unit.key, index, job.validation_fraction)
                                        else "train")
                writers[split].add(np.concatenate([np.asarray(ids, dtype=np.int64), eos]))
                index += 1
        shards = [s for split in SPLITS for s in writers[split].finish()]
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    record = {"unit": unit.index, "input": unit.identity, "documents": index - first_index, "shards": shards}
    storage.write_text_atomic(_record_path(job.output, unit.index), json.dumps(record, indent=1))
    return record


def _worker_init(threads: int) -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the HF tokenizer's thread pool


def _worker(args: tuple[Job, Unit]) -> dict:
    return tokenize_unit(*args)


# --------------------------------------------------------------------------- output bookkeeping


def _join(output: str, *names: str) -> str:
    return "/".join([output.rstrip("/"), *names])


def _record_path(output: str, unit: int):
    return storage.as_path(_join(output, PROGRESS, f"{unit:05d}.json"))


def _read_json(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _listing(output: str) -> dict[str, int]:
    """{name: size} of the files directly in the output folder."""
    if storage.is_gcs(output):
        fs = storage.gcs_fs()
        try:
            entries = fs.ls(output.removeprefix(storage.GCS_PREFIX), detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries
                if e.get("type") == "file"}
    with os.scandir(output) as it:
        return {e.name: e.stat().st_size for e in it if e.is_file()}


def _records(output: str) -> dict[int, dict]:
    """The progress records present, by unit."""
    folder = storage.as_path(_join(output, PROGRESS))
    if storage.is_gcs(output):
        fs = storage.gcs_fs()
        try:
            names = [posixpath.basename(n) for n in fs.ls(str(folder).removeprefix(storage.GCS_PREFIX))]
        except FileNotFoundError:
            names = []
    else:
        names = os.listdir(folder) if os.path.isdir(folder) else []
    out = {}
    for n in names:
        if re.fullmatch(r"\d{5,}\.json", n):
            rec = _read_json(folder / n)
            if rec is not None:
                out[int(n.split(".")[0])] = rec
    return out


def _reusable(rec: dict | None, unit: Unit, sizes: dict[str, int], itemsize: int) -> bool:
    if not rec or rec.get("unit") != unit.index or rec.get("input") != json.loads(json.dumps(unit.identity)):
        return False
    return all(sizes.get(s["file"]) == s["tokens"] * itemsize for s in rec.get("shards", []))


def _delete(output: str, names: list[str]) -> None:
    for name in names:
        p = storage.as_path(_join(output, name))
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _check_flags(output: str, flags: dict) -> None:
    """InputError when the output folder was made with other flags; records them for a new folder."""
    path = storage.as_path(_join(output, PROGRESS, FLAGS_NAME))
    old = _read_json(path)
    if old is None:
        m = _read_json(storage.as_path(_join(output, manifest_lib.MANIFEST_NAME)))
        if m is not None:  # a finished corpus whose .progress folder was removed
            src = m.get("source", {})
            old = {"tokenizer": {k: m.get("tokenizer", {}).get(k) for k in ("name", "sha256", "vocab_size", "eos_id")},
                   **{k: src.get(k) for k in flags if k != "tokenizer"}}
    if old is not None:
        diffs = [k for k in flags if old.get(k) != flags[k]]
        if diffs:
            what = "; ".join(f"{k}: {_show(old.get(k))} there, {_show(flags[k])} now" for k in diffs)
            raise InputError(f"--output {output} holds a corpus made with other flags ({what}); use the same flags "
                             "to finish or extend it, or pass a new --output (or delete that folder)")
        return
    storage.as_path(_join(output, PROGRESS)).mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(path, json.dumps(flags, indent=1, sort_keys=True))


def _show(v) -> str:
    if isinstance(v, dict) and "name" in v:
        return repr(v["name"])
    return repr(v)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


# --------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    v = int(text.replace("_", ""))
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vffn_jax.data tokenize", description=HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="a glob (quote it; ** allowed), a directory (searched recursively), a file, "
                        "tfds:NAME[:DATA_DIR], or a TFDS dataset directory; local or gs://")
    p.add_argument("--output", required=True, help="folder for the shards and manifest.json, local or gs://")
    p.add_argument("--tokenizer", required=True, help="olmo, byte, or a path to a HF tokenizers JSON file")
    p.add_argument("--shard-tokens", type=_positive_int, default=DEFAULT_SHARD_TOKENS,
                   help=f"most tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--workers", type=_positive_int, default=default_workers(),
                   help="worker processes (default min(cores, 8) = %(default)s; 1 = in this process)")
    p.add_argument("--validation-fraction", type=_fraction, default=0.0,
                   help="share of documents held out as split 'validation', by a hash of (file, document "
                        "index); 0 = none (default). A TFDS input's own validation split is kept instead")
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    p.add_argument("--docs-per-unit", type=_positive_int, default=DEFAULT_DOCS_PER_UNIT,
                   help=f"TFDS documents per unit of work (default {DEFAULT_DOCS_PER_UNIT:,})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except (InputError, ConfigError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        tok = _tokenizer(args.tokenizer)
    except (FileNotFoundError, ConfigError, ModuleNotFoundError) as e:
        raise InputError(f"--tokenizer {args.tokenizer}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a file that is not a tokenizer JSON
        raise InputError(f"--tokenizer {args.tokenizer}: not a HF tokenizers JSON file "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    output = str(storage.check_writable(args.output, "--output"))
    units, inputs = find_units(args.input, output, args.docs_per_unit)
    own_validation = units[0].kind == "tfds" and any(u.split == "validation" for u in units)
    dtype = manifest_lib.dtype_for(tok.vocab_size)
    itemsize = np.dtype(dtype).itemsize
    tok_id = {"name": tok.name, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    flags = {"tokenizer": tok_id, "shard_tokens": args.shard_tokens, "validation_fraction": args.validation_fraction,
             "text_field": args.text_field, "docs_per_unit": args.docs_per_unit if units[0].kind == "tfds" else None}
    _check_flags(output, flags)

    sizes, old = _listing(output), _records(output)
    done = {u.index: old[u.index] for u in units if _reusable(old.get(u.index), u, sizes, itemsize)}
    pending = [u for u in units if u.index not in done]
    man_path = storage.as_path(_join(output, manifest_lib.MANIFEST_NAME))
    if pending:
        if man_path.exists():  # the corpus is about to change: no manifest until it is complete again
            man_path.unlink()
        for u in pending:  # a unit about to be rewritten has no valid record meanwhile
            if u.index in old:
                _record_path(output, u.index).unlink()
    job = Job(output, args.tokenizer, dtype, args.shard_tokens,
              0.0 if own_validation else args.validation_fraction, args.text_field)
    new_tokens = _tokenize(job, pending, min(args.workers, max(len(pending), 1)), done, quiet=args.quiet)
    for u in pending:  # shards the unit's previous record listed that the new run did not write again
        written = {s["file"] for s in done[u.index]["shards"]}
        _delete(output, sorted({s["file"] for s in old.get(u.index, {}).get("shards", [])} - written))

    shards = [manifest_lib.Shard(**s) for u in units for s in done[u.index]["shards"]]
    n_docs = sum(done[u.index]["documents"] for u in units)
    if not n_docs:
        raise InputError(f"--input {args.input}: no documents found in {len(units)} input(s)")
    listed = {s.file for s in shards}
    _delete(output, sorted(n for n in _listing(output) if SHARD_RE.match(n) and n not in listed))
    source = {"inputs": inputs, "shard_tokens": args.shard_tokens, "validation_fraction": args.validation_fraction,
              "validation_from": "input" if own_validation else ("hash" if args.validation_fraction > 0 else None),
              "text_field": args.text_field, "docs_per_unit": flags["docs_per_unit"]}
    man = manifest_lib.Manifest(storage.as_path(output), {**tok_id, "spec": args.tokenizer}, dtype, tuple(shards),
                                source)
    storage.write_text_atomic(man_path, man.to_json())

    secs = time.perf_counter() - t0
    per_split = "; ".join(f"{s} {d['tokens']:,} tokens / {d['documents']:,} documents / {d['shards']} shards"
                          for s, d in man.splits().items())
    print(f"tokenized {len(units)} units ({len(pending)} new, {len(units) - len(pending)} reused; "
          f"{new_tokens:,} new tokens in {secs:.1f}s, {new_tokens / max(secs, 1e-9):,.0f} tokens/s): {per_split} "
          f"-> {man_path}")
    return 0


def _tokenize(job: Job, pending: list[Unit], workers: int, done: dict[int, dict], quiet: bool) -> int:
    """Tokenises `pending` (records into `done`); the number of tokens written."""
    from tqdm import tqdm

    t0, total = time.perf_counter(), 0
    bar = tqdm(total=len(pending), desc="tokenize", unit="unit", file=sys.stderr, disable=quiet or not pending,
               dynamic_ncols=True, mininterval=0.5)

    def finished(rec: dict) -> None:
        nonlocal total
        done[rec["unit"]] = rec
        total += sum(s["tokens"] for s in rec["shards"])
        bar.set_postfix_str(f"{total / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
        bar.update()

    try:
        if workers <= 1:
            for u in pending:
                finished(tokenize_unit(job, u))
        else:
            cores = default_workers()
            ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX/gcsfs threads
            with ctx.Pool(workers, initializer=_worker_init, initargs=(max(1, cores // workers),)) as pool:
                # Largest files first keeps the workers busy to the end; results do not depend on the order.
                order = sorted(pending, key=lambda u: -(u.size or (u.stop - u.start)))
                for rec in pool.imap_unordered(_worker, [(job, u) for u in order]):
                    finished(rec)
    finally:
        bar.close()
    return total


if __name__ == "__main__":
    raise SystemExit(main())
