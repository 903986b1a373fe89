"""The tokenising engine: raw documents -> flat token shards plus `manifest.json`, once, in parallel.

Both ways into training go through it: `vffn-tokenize --input ... --output FOLDER` (then `data.path=FOLDER`),
and `data.path=<raw input>`, which calls it into the token cache (vffn_jax/data/token_cache.py) with the same
defaults, so the same input gives the same shards, and the same held-out documents, either way.

    vffn-tokenize --input GLOB|DIR|FILE|tfds:NAME[:DATA_DIR] --output DIR|gs://... \\
        --tokenizer olmo|byte|PATH [--shard-tokens N] [--workers P] [--validation-fraction F] [--text-field text]

Inputs (local or gs://, read by vffn_jax/data/sources.py): `.txt` (one document per file, UTF-8, universal
newlines), `.jsonl` (one record per line, text in --text-field; `.json`: one list of records, one record, or
JSON lines), `.jsonl.gz` / `.json.gz` (Dolma: gzipped JSON lines), `.parquet` (FineWeb: a text column, read a
row group batch at a time), a TFDS dataset (`tfds:NAME[:DATA_DIR]`, or the directory holding its
dataset_info.json, local or gs://; splits train and validation).

Design:
  - Units of work. Input files are sorted by path (components, so local and gs:// inputs sort alike) and
    grouped, in that order, into units of about --unit-bytes (a larger file is a unit of its own); a TFDS
    split is cut into blocks of --docs-per-unit documents. Unit i writes its own shards
    `<split>-<i:05d>-<part:04d>.bin` (documents in order, each followed by EOS; a shard holds at most
    --shard-tokens tokens and a document is only split when it alone exceeds that), raw little-endian uint16
    when the vocabulary fits in 16 bits, else uint32 (`manifest.dtype_for`). A shard name only ever holds a
    complete shard (vffn_jax/data/shard_writer.py).
  - Parallelism: `--workers P` processes (spawned; P=1 tokenises in this process) take units from a queue.
    A unit's shards depend on the unit alone, so the output is byte-identical for every P.
  - Held-out documents: vffn_jax/data/splits.py, the one rule (a per-document hash below
    --validation-fraction, unless the input brings its own validation split).
  - Re-runs: after a unit's shards are written, `<output>/.progress/<unit:05d>.json` records its inputs'
    identity (path, size, mtime or GCS generation) and its shards (tokens, documents, sha256). A re-run
    with the same flags reuses every unit whose record matches and whose shards exist with the right
    sizes, and tokenises the rest. `<output>/.progress/flags.json` holds the flags the output was made
    with; other flags are refused (exit 2) instead of mixing two corpora.
  - The manifest is written last, once every unit is done: a manifest means a complete corpus. It has no
    timestamps, so it is byte-identical across runs and worker counts.
Errors in the input or the flags raise InputError naming the file (and line / field): exit 2.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

from vffn_jax import storage
from vffn_jax.data import manifest as manifest_lib
from vffn_jax.data import local_copies, sources, splits
from vffn_jax.data.shard_writer import (SHARD_RE, ShardWriter, check_flags, delete, join, listing, record_path,
                                        records, reusable)
from vffn_jax.data.splits import SPLITS
from vffn_jax.errors import ConfigError, InputError

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_DOCS_PER_UNIT = 100_000  # TFDS documents per unit of work
DEFAULT_UNIT_BYTES = 64 << 20  # input bytes per unit of work (consecutive files grouped up to this size)
BATCH_DOCS = 512  # documents per encode_batch call
BATCH_CHARS = 4 << 20  # ... or fewer when they hold this many characters
__all__ = ["InputError", "find_units", "tokenize", "tokenize_unit", "write_corpus"]

# --------------------------------------------------------------------------- inputs -> units


@dataclasses.dataclass(frozen=True)
class Part:
    """One input file of a unit."""

    path: str  # local absolute path or gs:// URL
    key: str  # path relative to the input root: feeds the held-out hash
    split: str | None  # the input's own split for this file, else None (the hash decides)


@dataclasses.dataclass(frozen=True)
class Unit:
    index: int
    kind: str  # "files" | "tfds"
    identity: tuple  # what the progress record must match to reuse the unit's shards (JSON-able)
    parts: tuple[Part, ...] = ()  # files only
    size: int = 0  # bytes of the input files (files only)
    data_dir: str = ""  # TFDS dataset directory (local)
    split: str = ""  # TFDS split
    start: int = 0  # TFDS documents [start, stop) of the split
    stop: int = 0

    def label(self) -> str:
        if self.kind == "tfds":
            return f"tfds {self.split}[{self.start}:{self.stop}]"
        return self.parts[0].key + (f" (+{len(self.parts) - 1} files)" if len(self.parts) > 1 else "")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The units of an input spec and what the manifest says about it."""

    units: list[Unit]
    summary: dict  # the manifest's source.inputs
    own_validation: bool  # the input brings its own validation split (no hash)
    label: str  # a short name for the cache folder


def _file_units(spec: str, what: str, exclude: str | None, unit_bytes: int, accepted: str) -> Inputs:
    files = sources.list_files(spec, what, accepted, exclude=exclude)
    own = any(splits.own_split_of_file(f.rel) == "validation" for f in files)
    groups: list[list[sources.InputFile]] = []
    size = 0
    for f in files:
        if not groups or (size + f.size > unit_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += f.size
    units = [Unit(i, "files", tuple(f.stat() for f in g),
                  parts=tuple(Part(f.path, f.rel, splits.own_split_of_file(f.rel) if own else None) for f in g),
                  size=sum(f.size for f in g)) for i, g in enumerate(groups)]
    summary = {"spec": spec, "files": len(files), "bytes": sum(f.size for f in files),
               "own_validation": f"{splits.VALIDATION_FOLDER}/" if own else None}
    return Inputs(units, summary, own, sources.files_label(spec, files))


def _tfds_units(data_dir: str, spec: str, docs_per_unit: int, origin: list | None = None) -> Inputs:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(data_dir)
    sizes = sources.tfds_splits(builder)
    if "train" not in sizes:
        raise InputError(f"{spec}: the TFDS dataset has no 'train' split (splits: {sorted(sizes)})")
    ignored = sorted(set(sizes) - set(SPLITS))
    if ignored:
        print(f"note: ignoring TFDS split(s) {ignored} of {data_dir}", file=sys.stderr)
    stats = origin if origin is not None else sources.local_stats(data_dir)
    units = []
    for split in [s for s in SPLITS if s in sizes]:
        for start in range(0, sizes[split], docs_per_unit):
            stop = min(start + docs_per_unit, sizes[split])
            units.append(Unit(len(units), "tfds", ("tfds", split, start, stop, stats), data_dir=data_dir,
                              split=split, start=start, stop=stop))
    summary = {"spec": spec, "tfds_splits": {s: sizes[s] for s in SPLITS if s in sizes},
               "bytes": sum(s[1] for s in stats)}
    return Inputs(units, summary, "validation" in sizes, builder.name)


def find_units(spec: str, *, what: str = "", output: str = "", docs_per_unit: int = DEFAULT_DOCS_PER_UNIT,
               unit_bytes: int = DEFAULT_UNIT_BYTES, cache_dir: str = "", accepted: str = "") -> Inputs:
    """The units of work of the input `spec` (named `what` in errors, default `--input SPEC`). A gs:// TFDS
    dataset directory is copied once into the local cache first (ArrayRecord reads local files). `accepted`
    (what the caller takes) ends the message of a path that matches nothing."""
    what = what or f"--input {spec}"
    if spec.startswith("tfds:"):
        return _tfds_units(str(sources.tfds_builder(spec, what).data_dir), spec, docs_per_unit)
    if sources.is_tfds_dir(spec):
        return _tfds_units(os.path.abspath(os.path.expanduser(spec)), spec, docs_per_unit)
    if storage.is_gcs(spec) and not glob.has_magic(spec):
        local = local_copies.local_copy_of_gcs_tfds_dir(spec, what, cache_dir, accepted)
        if local is not None:
            return _tfds_units(str(local[0]), spec, docs_per_unit, origin=local[1])
    out_local = str(storage.local_path(output)) if output and not storage.is_gcs(output) else None
    return _file_units(spec, what, out_local, unit_bytes, accepted)


# --------------------------------------------------------------------------- documents of a unit


def _unit_docs(unit: Unit, field: str, hint: str) -> Iterator[tuple[str, int, str | None, str]]:
    """(hash key, document index, the file's own split or None, text) of every document of the unit, in order."""
    if unit.kind == "tfds":
        for i, text in sources.tfds_docs(unit.data_dir, unit.split, unit.start, unit.stop, field, hint):
            yield unit.split, i, None, text
        return
    for part in unit.parts:
        for i, text in enumerate(sources.file_docs(part.path, field, hint)):
            yield part.key, i, part.split, text


def _batches(docs: Iterator[tuple]) -> Iterator[list[tuple]]:
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d[-1])
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


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
    validation_fraction: float
    own_validation: bool  # the input brings its own validation split: no hash
    text_field: str
    hint: str = "set --text-field"


def tokenize_unit(job: Job, unit: Unit) -> dict:
    """Writes the unit's shards and its progress record; returns the record."""
    tok = _tokenizer(job.tokenizer)
    dtype = np.dtype(job.dtype).newbyteorder("<")
    eos = np.array([tok.eos_id], dtype=np.int64)
    tfds_split = unit.split if unit.kind == "tfds" and job.own_validation else None
    writers = {s: ShardWriter(job.output, s, unit.index, job.shard_tokens, dtype) for s in SPLITS}
    n_docs = 0
    try:
        for batch in _batches(_unit_docs(unit, job.text_field, job.hint)):
            for (key, index, fixed, _), ids in zip(batch, tok.encode_batch([d[-1] for d in batch])):
                split = fixed or tfds_split or (
                    "validation" if splits.in_validation(key, index, job.validation_fraction) else "train")
                writers[split].add(np.concatenate([np.asarray(ids, dtype=np.int64), eos]))
                n_docs += 1
        shards = [s for split in SPLITS for s in writers[split].finish()]
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    record = {"unit": unit.index, "input": unit.identity, "documents": n_docs, "shards": shards}
    storage.write_text_atomic(record_path(job.output, unit.index), json.dumps(record, indent=1))
    return record


def _worker_init(threads: int) -> None:
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the HF tokenizer's thread pool


def _worker(args: tuple[Job, Unit]) -> dict:
    return tokenize_unit(*args)


# --------------------------------------------------------------------------- the corpus


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def load_tokenizer_for(spec: str, what: str = "--tokenizer"):
    """The tokenizer of `spec`; InputError naming `what` when it cannot be loaded."""
    try:
        return _tokenizer(spec)
    except (FileNotFoundError, ConfigError, ModuleNotFoundError) as e:
        raise InputError(f"{what} {spec}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a file that is not a tokenizer JSON
        raise InputError(f"{what} {spec}: not a HF tokenizers JSON file "
                         f"({type(e).__name__}: {sources.first_line(e)})") from None


def write_corpus(inputs: Inputs, output: str, tokenizer: str, *, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 workers: int = 1, validation_fraction: float = 0.0, text_field: str = "text",
                 docs_per_unit: int = DEFAULT_DOCS_PER_UNIT, unit_bytes: int = DEFAULT_UNIT_BYTES,
                 quiet: bool = False, hint: str = "set --text-field") -> str:
    """Tokenises the units of `inputs` into `output` (shards, then manifest.json last; re-runs reuse finished
    units); returns the one-line report."""
    t0 = time.perf_counter()
    tok = load_tokenizer_for(tokenizer)
    units = inputs.units
    dtype = manifest_lib.dtype_for(tok.vocab_size)
    itemsize = np.dtype(dtype).itemsize
    tok_id = {"name": tok.name, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    tfds = units[0].kind == "tfds"
    flags = {"tokenizer": tok_id, "shard_tokens": shard_tokens, "validation_fraction": validation_fraction,
             "text_field": text_field, "docs_per_unit": docs_per_unit if tfds else None,
             "unit_bytes": None if tfds else unit_bytes}
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
    job = Job(output, tokenizer, dtype, shard_tokens, validation_fraction, inputs.own_validation, text_field, hint)
    new_tokens = _tokenize(job, pending, min(workers, max(len(pending), 1)), done, quiet=quiet)
    for u in pending:  # shards the unit's previous record listed that the new run did not write again
        written = {s["file"] for s in done[u.index]["shards"]}
        delete(output, sorted({s["file"] for s in old.get(u.index, {}).get("shards", [])} - written))

    shards = [manifest_lib.Shard(**s) for u in units for s in done[u.index]["shards"]]
    n_docs = sum(done[u.index]["documents"] for u in units)
    if not n_docs:
        raise InputError(f"{inputs.summary['spec'] or 'the input'}: no documents found in {len(units)} unit(s)")
    listed = {s.file for s in shards}
    delete(output, sorted(n for n in listing(output) if SHARD_RE.match(n) and n not in listed))
    source = {"inputs": inputs.summary, "shard_tokens": shard_tokens, "validation_fraction": validation_fraction,
              "validation_from": "input" if inputs.own_validation else ("hash" if validation_fraction > 0 else None),
              "text_field": text_field, "docs_per_unit": flags["docs_per_unit"], "unit_bytes": flags["unit_bytes"]}
    man = manifest_lib.Manifest(storage.as_path(output), {**tok_id, "spec": tokenizer}, dtype, tuple(shards), source)
    storage.write_text_atomic(man_path, man.to_json())

    secs = time.perf_counter() - t0
    per_split = "; ".join(f"{s} {d['tokens']:,} tokens / {d['documents']:,} documents / {d['shards']} shards"
                          for s, d in man.splits().items())
    return (f"tokenized {len(units)} units ({len(pending)} new, {len(units) - len(pending)} reused; "
            f"{new_tokens:,} new tokens in {secs:.1f}s, {new_tokens / max(secs, 1e-9):,.0f} tokens/s): {per_split} "
            f"-> {man_path}")


def tokenize(input: str, output: str, tokenizer: str, *, shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 1,
             validation_fraction: float = 0.0, text_field: str = "text", docs_per_unit: int = DEFAULT_DOCS_PER_UNIT,
             unit_bytes: int = DEFAULT_UNIT_BYTES, quiet: bool = False, cache_dir: str = "") -> str:
    """`vffn-tokenize`: tokenises `input` into `output`; returns the one-line report. InputError /
    ConfigError / FileNotFoundError name the file or flag."""
    load_tokenizer_for(tokenizer)  # a bad --tokenizer is reported before the input is listed
    output = str(storage.check_writable(output, "--output"))
    inputs = find_units(input, output=output, docs_per_unit=docs_per_unit, unit_bytes=unit_bytes,
                        cache_dir=cache_dir)
    return write_corpus(inputs, output, tokenizer, shard_tokens=shard_tokens, workers=workers,
                        validation_fraction=validation_fraction, text_field=text_field, docs_per_unit=docs_per_unit,
                        unit_bytes=unit_bytes, quiet=quiet)


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
                # Largest units first keeps the workers busy to the end; results do not depend on the order.
                order = sorted(pending, key=lambda u: -(u.size or (u.stop - u.start)))
                for rec in pool.imap_unordered(_worker, [(job, u) for u in order]):
                    finished(rec)
    finally:
        bar.close()
    return total
