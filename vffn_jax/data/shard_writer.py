"""The writing end of token shards: shard files written atomically (`ShardWriter`), and the bookkeeping of
an engine output folder (local or gs://): per-unit progress records and the flags the folder was made with."""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tempfile
import uuid

import numpy as np

from vffn_jax import storage
from vffn_jax.data import manifest as manifest_lib
from vffn_jax.errors import InputError

PROGRESS = ".progress"
FLAGS_NAME = "flags.json"
SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<unit>\d{5})-(?P<part>\d{4})\.bin$")


class ShardWriter:
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

def join(output: str, *names: str) -> str:
    return "/".join([output.rstrip("/"), *names])


def record_path(output: str, unit: int):
    return storage.as_path(join(output, PROGRESS, f"{unit:05d}.json"))


def _read_json(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def listing(output: str) -> dict[str, int]:
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


def records(output: str) -> dict[int, dict]:
    """The progress records present, by unit."""
    folder = storage.as_path(join(output, PROGRESS))
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


def reusable(rec: dict | None, unit,  sizes: dict[str, int], itemsize: int) -> bool:
    if not rec or rec.get("unit") != unit.index or rec.get("input") != json.loads(json.dumps(unit.identity)):
        return False
    return all(sizes.get(s["file"]) == s["tokens"] * itemsize for s in rec.get("shards", []))


def delete(output: str, names: list[str]) -> None:
    for name in names:
        p = storage.as_path(join(output, name))
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def check_flags(output: str, flags: dict) -> None:
    """InputError when the output folder was made with other flags; records them for a new folder."""
    path = storage.as_path(join(output, PROGRESS, FLAGS_NAME))
    old = _read_json(path)
    if old is None:
        m = _read_json(storage.as_path(join(output, manifest_lib.MANIFEST_NAME)))
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
    storage.as_path(join(output, PROGRESS)).mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(path, json.dumps(flags, indent=1, sort_keys=True))


def _show(v) -> str:
    if isinstance(v, dict) and "name" in v:
        return repr(v["name"])
    return repr(v)
