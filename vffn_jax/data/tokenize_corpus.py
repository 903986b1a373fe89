"""Tokenise a raw text corpus once, in parallel, into flat token shards plus `manifest.json`.

    vffn-tokenize --input GLOB|DIR|FILE|tfds:NAME[:DATA_DIR] --output DIR|gs://... \\
        --tokenizer olmo|byte|PATH [--shard-tokens N] [--workers P] [--validation-fraction F] [--text-field text]

Inputs (local or gs://, read by vffn_jax/data/sources.py, as training reads data.path): `.txt` (one document
per file, universal newlines), `.jsonl` (one record per line, text in --text-field; `.json`: one list of
records, one record, or JSON lines), `.jsonl.gz` / `.json.gz` (Dolma: gzipped JSON lines), `.parquet`
(FineWeb: a text column, read a row group batch at a time), a TFDS dataset (`tfds:NAME[:DATA_DIR]`, or the
directory holding its dataset_info.json; splits train and validation).

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

import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import sys
import time
import types
from collections.abc import Iterator

import numpy as np

from vffn_jax import storage
from vffn_jax.config import ConfigError
from vffn_jax.data import manifest as manifest_lib
from vffn_jax.data import sources
from vffn_jax.data.shard_output import (PROGRESS, SHARD_RE, ShardWriter, check_flags, delete, join, listing,
                                        record_path, records, reusable)
from vffn_jax.data.sources import SPLITS, SUFFIXES, SourceError as InputError, first_line as _first_line

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_DOCS_PER_UNIT = 100_000  # TFDS documents per unit of work
BATCH_DOCS = 512  # documents per encode_batch call
BATCH_CHARS = 4 << 20  # ... or fewer when they hold this many characters
__all__ = ["InputError", "PROGRESS", "SHARD_RE", "SUFFIXES", "find_units", "in_validation", "tokenize", "tokenize_unit"]

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



def _file_units(spec: str, output: str) -> list[Unit]:
    out_local = storage.local_path(output) if not storage.is_gcs(output) else None
    files = sources.list_files(spec, f"--input {spec}", exclude=str(out_local) if out_local else None)
    return [Unit(i, "file", f.path, f.rel, {"path": f.path, "size": f.size, "version": f.version}, size=f.size)
            for i, f in enumerate(files)]


def _tfds_dir(spec: str) -> str:
    """The dataset directory (holding dataset_info.json) of `tfds:NAME[:DATA_DIR]`."""
    return str(sources.tfds_builder(spec, f"--input {spec}").data_dir)


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
    elif sources.is_tfds_dir(spec):
        data_dir = os.path.abspath(os.path.expanduser(spec))
    else:
        if storage.is_gcs(spec) and not glob.has_magic(spec):
            try:
                is_tfds = storage.as_path(f"{spec.rstrip('/')}/dataset_info.json").exists()
            except Exception:  # noqa: BLE001 - unreadable: list_files says why
                is_tfds = False
            if is_tfds:
                raise InputError(f"--input {spec} is a TFDS dataset directory on gs://, which is not "
                                 "supported (ArrayRecord reads local files); copy it to a local folder")
        units = _file_units(spec, output)
        return units, {"spec": spec, "count": len(units), "bytes": sum(u.size for u in units)}
    units, sizes, nbytes = _tfds_units(data_dir, docs_per_unit)
    return units, {"spec": spec, "tfds_splits": {s: sizes[s] for s in SPLITS if s in sizes}, "count": len(units),
                   "bytes": nbytes}


# --------------------------------------------------------------------------- documents of a unit


def _file_docs(unit: Unit, field: str) -> Iterator[str]:
    return sources.file_docs(unit.path, field, hint="set --text-field")


def _tfds_docs(unit: Unit, field: str) -> Iterator[str]:
    import tensorflow_datasets as tfds

    source = tfds.builder_from_directory(unit.path).as_data_source(unit.split)
    for start in range(unit.start, unit.stop, BATCH_DOCS):
        idx = list(range(start, min(start + BATCH_DOCS, unit.stop)))
        for i, record in zip(idx, source.__getitems__(idx)):
            yield sources.record_text(record, f"{unit.path} split {unit.split} record {i}", field, "set --text-field")


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

# --------------------------------------------------------------------------- a unit -> shards


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
    writers = {s: ShardWriter(job.output, s, unit.index, job.shard_tokens, dtype) for s in SPLITS}
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
    storage.write_text_atomic(record_path(job.output, unit.index), json.dumps(record, indent=1))
    return record


def _worker_init(threads: int) -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the HF tokenizer's thread pool


def _worker(args: tuple[Job, Unit]) -> dict:
    return tokenize_unit(*args)

# --------------------------------------------------------------------------- CLI


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def tokenize(input: str, output: str, tokenizer: str, *, shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1,
             validation_fraction: float = 0.0, text_field: str = "text", docs_per_unit: int = DEFAULT_DOCS_PER_UNIT,
             quiet: bool = False) -> str:
    """Tokenises `input` into `output` (shards, then manifest.json last; re-runs reuse finished units); returns
    the one-line report. InputError / ConfigError name the file or flag."""
    args = types.SimpleNamespace(input=input, output=output, tokenizer=tokenizer, shard_tokens=shard_tokens,
                              workers=workers, validation_fraction=validation_fraction, text_field=text_field,
                              docs_per_unit=docs_per_unit, quiet=quiet)
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
    check_flags(output, flags)

    sizes, old = listing(output), records(output)
    done = {u.index: old[u.index] for u in units if reusable(old.get(u.index), u, sizes, itemsize)}
    pending = [u for u in units if u.index not in done]
    man_path = storage.as_path(join(output, manifest_lib.MANIFEST_NAME))
    if pending:
        if man_path.exists():  # the corpus is about to change: no manifest until it is complete again
            man_path.unlink()
        for u in pending:  # a unit about to be rewritten has no valid record meanwhile
            if u.index in old:
                record_path(output, u.index).unlink()
    job = Job(output, args.tokenizer, dtype, args.shard_tokens,
              0.0 if own_validation else args.validation_fraction, args.text_field)
    new_tokens = _tokenize(job, pending, min(args.workers, max(len(pending), 1)), done, quiet=args.quiet)
    for u in pending:  # shards the unit's previous record listed that the new run did not write again
        written = {s["file"] for s in done[u.index]["shards"]}
        delete(output, sorted({s["file"] for s in old.get(u.index, {}).get("shards", [])} - written))

    shards = [manifest_lib.Shard(**s) for u in units for s in done[u.index]["shards"]]
    n_docs = sum(done[u.index]["documents"] for u in units)
    if not n_docs:
        raise InputError(f"--input {args.input}: no documents found in {len(units)} input(s)")
    listed = {s.file for s in shards}
    delete(output, sorted(n for n in listing(output) if SHARD_RE.match(n) and n not in listed))
    source = {"inputs": inputs, "shard_tokens": args.shard_tokens, "validation_fraction": args.validation_fraction,
              "validation_from": "input" if own_validation else ("hash" if args.validation_fraction > 0 else None),
              "text_field": args.text_field, "docs_per_unit": flags["docs_per_unit"]}
    man = manifest_lib.Manifest(storage.as_path(output), {**tok_id, "spec": args.tokenizer}, dtype, tuple(shards),
                                source)
    storage.write_text_atomic(man_path, man.to_json())

    secs = time.perf_counter() - t0
    per_split = "; ".join(f"{s} {d['tokens']:,} tokens / {d['documents']:,} documents / {d['shards']} shards"
                          for s, d in man.splits().items())
    return (f"tokenized {len(units)} units ({len(pending)} new, {len(units) - len(pending)} reused; "
            f"{new_tokens:,} new tokens in {secs:.1f}s, {new_tokens / max(secs, 1e-9):,.0f} tokens/s): {per_split} "
            f"-> {man_path}")


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

