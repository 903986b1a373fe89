"""Source readers shared by training (`data.path`) and `python -m vffn_jax.data tokenize` (`--input`).

Two jobs, one set of rules and errors:
  - enumerate the inputs of a spec: a file, a directory (recursive), a glob (`**` allowed), local or gs://
    (`list_files`, `gcs_listing`), or a TFDS dataset (`tfds_builder`: `tfds:NAME[:DATA_DIR]`, or the directory
    holding dataset_info.json). Files sort by path components, so local and gs:// inputs sort alike; hidden
    files and folders are skipped.
  - iterate the documents of a file (`file_docs`): .txt (one document, UTF-8 with errors replaced, universal
    newlines), .jsonl (one record per non-blank line), .json (a list of records, one record, or JSON lines),
    .jsonl.gz / .json.gz (gzipped JSON lines), .parquet (a text column, a row group batch at a time).

Also the documents of a TFDS split (`tfds_docs`).

Errors: a bad document raises `InputError` (a ConfigError) naming the file and the line / record / row and
the fix; a path that does not exist or matches nothing raises FileNotFoundError naming the spec (and the
bucket, when it is the bucket that is missing). Splits are named `SPLITS` everywhere.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import posixpath
import re
from collections.abc import Iterator

from vffn_jax import storage
from vffn_jax.errors import ConfigError, InputError

SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
SUFFIX_LIST = "/".join(SUFFIXES)  # ".txt/.jsonl/..." in messages
DATA_PATH_ACCEPTS = ('data.path accepts "" (default corpus), tfds:NAME[:DATA_DIR], a TFDS dataset directory, a '
                     "directory / glob / file of .txt, .jsonl, .json, .jsonl.gz, .json.gz, .parquet documents, a "
                     '.npy / .bin token file, a token-shard folder (manifest.json) or "synthetic"')
PARQUET_BATCH_ROWS = 1024
TFDS_BATCH_DOCS = 512  # records per TFDS read
_TFDS_RE = re.compile(r"tfds:(?P<name>[^:]+(?::\d+\.\d+\.\d+)?)(?::(?P<dir>.+))?")


@dataclasses.dataclass(frozen=True)
class InputFile:
    rel: str  # path relative to the input root, "/"-separated
    path: str  # local absolute path or gs:// URL
    size: int
    version: str  # local mtime_ns, or the GCS generation: changes whenever the file is rewritten

    def stat(self) -> list:
        return [self.path, self.size, self.version]


def suffix(name: str) -> str:
    """The document suffix of `name` (longest of SUFFIXES that matches), or ""."""
    lower = name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if lower.endswith(s)), "")


def sort_key(rel: str) -> list[str]:
    return rel.split("/")


def glob_root(spec: str) -> str:
    """The folder part of a glob before its first wildcard."""
    parts = spec.split("/")
    i = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return "/".join(parts[:i])


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


# --------------------------------------------------------------------------- enumerating inputs


def local_files(spec: str, label: str, accepted: str = "", exclude: str | None = None) -> list[InputFile]:
    """The document files of a local glob, directory or file, sorted; FileNotFoundError when none."""
    tail = f"; {accepted}" if accepted else ""
    if glob.has_magic(spec):
        root = os.path.abspath(os.path.expanduser(glob_root(spec) or "."))
        files = [os.path.abspath(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p)]
        none = "matches no"
    else:
        path = os.path.abspath(os.path.expanduser(spec))
        if os.path.isdir(path):
            root, files = path, []
            for d, dirs, names in os.walk(path):
                dirs[:] = [x for x in dirs if not x.startswith(".") and os.path.join(d, x) != exclude]
                files += [os.path.join(d, n) for n in names if not n.startswith(".")]
            none = "is a directory without"
        elif os.path.isfile(path):
            if not suffix(path):
                raise InputError(f"{label}: unsupported file type {os.path.splitext(path)[1]!r}; expected one of "
                                  f"{', '.join(SUFFIXES)}{tail}")
            root, files, none = os.path.dirname(path), [path], ""
        else:
            raise FileNotFoundError(f"{label} does not exist{tail}")
    rels = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
    found = []
    for rel, f in zip(rels, files):
        if suffix(f) and not (exclude and f.startswith(exclude + os.sep)) \
                and not any(p.startswith(".") for p in rel.split("/") if p != ".."):
            st = os.stat(f)
            found.append(InputFile(rel, f, st.st_size, str(st.st_mtime_ns)))
    if not found:
        raise FileNotFoundError(f"{label} {none} {SUFFIX_LIST} files{tail}")
    return sorted(found, key=lambda x: sort_key(x.rel))


def gcs_version(info: dict) -> str:
    return str(info.get("generation") or info.get("md5Hash") or info.get("etag") or info.get("updated", ""))


def gcs_missing(fs, spec: str, label: str, problem: str, accepted: str = "") -> FileNotFoundError:
    """FileNotFoundError for `problem`, saying so when the bucket itself is missing or unreadable."""
    bucket = spec.removeprefix(storage.GCS_PREFIX).split("/", 1)[0]
    try:
        bucket_ok = bool(fs.exists(bucket))
    except Exception:  # noqa: BLE001 - any failure here means the bucket cannot be read
        bucket_ok = False
    note = "" if bucket_ok else (f" (bucket gs://{bucket} does not exist or cannot be read: create it, or check this "
                                 "machine's credentials: gcloud auth application-default login, or the VM's service "
                                 "account with roles/storage.objectViewer)")
    return FileNotFoundError(f"{label} {problem}{note}" + (f"; {accepted}" if accepted else ""))


def gcs_read_error(spec: str, label: str, e: Exception) -> InputError:
    bucket = spec.removeprefix(storage.GCS_PREFIX).split("/", 1)[0]
    return InputError(f"{label}: cannot read it ({type(e).__name__}: {first_line(e)}); check that bucket "
                       f"gs://{bucket} exists and that this machine's credentials may read it (gcloud auth "
                       "application-default login, or the VM's service account with roles/storage.objectViewer)")


def gcs_listing(spec: str, label: str, accepted: str = "") -> tuple[str, dict[str, dict], dict | None]:
    """(root URL, {object name: info}, info of `spec` itself when it is one object, else None) of a gs:// glob,
    prefix or object. FileNotFoundError when nothing is there; InputError when the bucket cannot be read."""
    url = str(storage.as_path(spec))  # ConfigError for a malformed gs:// path
    fs = storage.gcs_fs()
    try:
        if glob.has_magic(spec):
            try:
                objects = fs.glob(url, detail=True)
            except FileNotFoundError:  # gcsfs: the bucket does not exist
                objects = {}
            if not objects:
                raise gcs_missing(fs, spec, label, f"matches no {SUFFIX_LIST} files", accepted)
            return glob_root(url), objects, None
        try:
            info = fs.info(url)
        except FileNotFoundError:
            raise gcs_missing(fs, spec, label, "does not exist", accepted) from None
        if info["type"] == "directory":
            return url, fs.find(url, detail=True), None
        return posixpath.dirname(url), {url.removeprefix(storage.GCS_PREFIX): info}, info
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types; all mean "cannot read"
        raise gcs_read_error(spec, label, e) from None


def gcs_files(spec: str, root: str, objects: dict[str, dict], label: str, accepted: str = "") -> list[InputFile]:
    """The document objects of a gcs_listing, sorted like local paths; FileNotFoundError when none."""
    root_rel = root.removeprefix(storage.GCS_PREFIX).rstrip("/")
    found = []
    for name, info in objects.items():
        name = name.removeprefix(storage.GCS_PREFIX)
        if info.get("type") == "file" and suffix(name):
            rel = name[len(root_rel) + 1:] if name.startswith(root_rel + "/") else posixpath.basename(name)
            if not any(p.startswith(".") for p in rel.split("/")):
                found.append(InputFile(rel, storage.GCS_PREFIX + name, int(info["size"]), gcs_version(info)))
    if not found:
        problem = "matches no" if glob.has_magic(spec) else "is a directory without"
        raise gcs_missing(storage.gcs_fs(), spec, label, f"{problem} {SUFFIX_LIST} files", accepted)
    return sorted(found, key=lambda x: sort_key(x.rel))


def list_files(spec: str, label: str, accepted: str = "", exclude: str | None = None) -> list[InputFile]:
    """The document files of a local or gs:// glob, directory or file."""
    if not storage.is_gcs(spec):
        return local_files(spec, label, accepted, exclude)
    root, objects, one = gcs_listing(spec, label, accepted)
    if one is not None and not suffix(spec):
        raise InputError(f"{label}: unsupported file type {posixpath.splitext(spec)[1]!r}; expected one of "
                          f"{', '.join(SUFFIXES)}" + (f"; {accepted}" if accepted else ""))
    return gcs_files(spec, root, objects, label, accepted)


def tfds_builder(spec: str, label: str):
    """The prepared TFDS builder of `tfds:NAME[:DATA_DIR]`."""
    import tensorflow_datasets as tfds

    m = _TFDS_RE.fullmatch(spec)
    if not m:
        raise InputError(f"{label}: expected tfds:NAME[:DATA_DIR] (NAME may carry :VERSION)")
    if m["dir"] and storage.is_gcs(m["dir"]):
        raise InputError(f"{label}: a TFDS data_dir on gs:// is not supported; pass the dataset's directory "
                          "instead (gs://.../NAME/VERSION, the one holding dataset_info.json), or copy it locally")
    data_dir = os.path.abspath(os.path.expanduser(m["dir"])) if m["dir"] else None
    try:
        builder = tfds.builder(m["name"], data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises several registry/lookup error types
        raise FileNotFoundError(f"{label}: TFDS dataset {m['name']!r} not found ({type(e).__name__}: "
                                f"{first_line(e)})") from None
    if not builder.is_prepared():
        raise FileNotFoundError(f"{label}: TFDS dataset is not prepared under {builder.data_dir}; "
                                "prepare it first (tfds build) or pass its DATA_DIR")
    return builder


def is_tfds_dir(spec: str) -> bool:
    return not storage.is_gcs(spec) and os.path.isfile(os.path.join(os.path.expanduser(spec), "dataset_info.json"))


def tfds_splits(builder) -> dict[str, int]:
    return {name: info.num_examples for name, info in builder.info.splits.items()}


def local_stats(data_dir: str) -> list[list]:
    """[name, size, mtime_ns] of the files of a local folder: the identity of a local TFDS dataset."""
    names = sorted(n for n in os.listdir(data_dir) if os.path.isfile(os.path.join(data_dir, n)))
    return [[n, (st := os.stat(os.path.join(data_dir, n))).st_size, st.st_mtime_ns] for n in names]


def tfds_docs(data_dir: str, split: str, start: int, stop: int, field: str,
              hint: str = "set data.text_field") -> Iterator[tuple[int, str]]:
    """(index, text) of records [start, stop) of `split` of the local TFDS dataset at `data_dir`."""
    import tensorflow_datasets as tfds

    source = tfds.builder_from_directory(data_dir).as_data_source(split)
    for first in range(start, stop, TFDS_BATCH_DOCS):
        idx = list(range(first, min(first + TFDS_BATCH_DOCS, stop)))
        for i, record in zip(idx, source.__getitems__(idx)):
            yield i, record_text(record, f"{data_dir} split {split} record {i}", field, hint)


def files_label(spec: str, files: list[InputFile]) -> str:
    """A short name for the input `spec` (its folder, glob root or file stem), for cache folder names."""
    spec = spec.rstrip("/")
    name = spec.rsplit("/", 1)[-1]
    if glob.has_magic(spec):
        return glob_root(spec).rstrip("/").rsplit("/", 1)[-1] or "glob"
    if len(files) == 1 and files[0].path.rstrip("/").endswith(name) and suffix(name):
        return name[:-len(suffix(name))]
    return name or "files"


# --------------------------------------------------------------------------- documents of a file


def _text(value, where: str, field: str, hint: str) -> str:
    if isinstance(value, dict):
        if field not in value:
            raise InputError(f"{where}: record has no field {field!r} (fields: {sorted(value)[:10]}); {hint}")
        value = value[field]
    if value is None:
        raise InputError(f"{where}: field {field!r} is null")
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise InputError(f"{where}: field {field!r} is a {type(value).__name__}, not text")
    return value


def record_text(record, where: str, field: str, hint: str = "set data.text_field") -> str:
    """The text of a record (a dict holding `field`, or a str / bytes)."""
    return _text(record, where, field, hint)


def _utf8(data: bytes, where: str) -> str:
    """`data` decoded as UTF-8 with universal newlines; InputError naming the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not valid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}); convert the "
                         "file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) or remove it from the input") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_lines(fh, where: str, field: str, hint: str) -> Iterator[str]:
    offset = 0
    for n, line in enumerate(fh, 1):
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{where} line {n}: not valid UTF-8 at byte {start + e.start} of the "
                             f"{'decompressed ' if where.endswith('.gz') else ''}file; convert the file to UTF-8 "
                             "or remove the line") from None
        try:
            record = json.loads(line)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise InputError(f"{where} line {n}: not valid JSON ({e})") from None
        yield _text(record, f"{where} line {n}", field, hint)


def _parquet_file(fh, where: str, field: str, hint: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fh)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid and others
        raise InputError(f"{where}: not a readable parquet file ({first_line(e)})") from None
    if field not in pf.schema_arrow.names:
        raise InputError(f"{where}: no column {field!r} (columns: {pf.schema_arrow.names[:10]}); {hint}")
    return pf


def _parquet_docs(fh, where: str, field: str, hint: str) -> Iterator[str]:
    pf, row = _parquet_file(fh, where, field, hint), 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _text(value, f"{where} row {row}", field, hint)


def _json_file(raw, where: str) -> object | None:
    """The parsed .json file when it is one JSON value (a list, or one record), else None (JSON lines)."""
    data = raw.read()
    raw.seek(0)
    try:
        return json.loads(data)
    except ValueError as e:
        if data.lstrip()[:1] == b"[":
            raise InputError(f"{where}: not valid JSON ({e})") from None
        return None


def _gunzip(raw, where: str):
    fh = gzip.GzipFile(fileobj=raw)

    def lines():
        try:
            yield from fh
        except (OSError, EOFError) as e:
            raise InputError(f"{where}: cannot decompress ({e})") from None
    return lines()


def file_docs(path: str, field: str, hint: str = "set data.text_field") -> Iterator[str]:
    """The documents of one file (local path or gs:// URL), in order."""
    kind, where = suffix(path), str(path)
    with storage.as_path(path).open("rb") as raw:
        if kind == ".txt":
            yield _utf8(raw.read(), where)
        elif kind == ".parquet":
            yield from _parquet_docs(raw, where, field, hint)
        elif kind.endswith(".gz"):
            yield from _json_lines(_gunzip(raw, where), where, field, hint)
        elif kind == ".json" and (data := _json_file(raw, where)) is not None:
            for n, record in enumerate(data if isinstance(data, list) else [data]):
                yield _text(record, f"{where} record {n}", field, hint)
        else:
            yield from _json_lines(raw, where, field, hint)


def count_docs(path: str, field: str = "text") -> int:
    """The number of documents `file_docs` yields, without parsing them where the format allows."""
    kind = suffix(path)
    if kind == ".txt":
        return 1
    with storage.as_path(path).open("rb") as raw:
        if kind == ".parquet":
            return _parquet_file(raw, str(path), field, "").metadata.num_rows
        if kind == ".json" and (data := _json_file(raw, str(path))) is not None:
            return len(data) if isinstance(data, list) else 1
        lines = _gunzip(raw, str(path)) if kind.endswith(".gz") else raw
        return sum(1 for line in lines if line.strip())
