"""The reading end of token shards: training windows read straight from a `manifest.json` folder (local or gs://).

Nothing is tokenised or copied at train time. `ShardWindows` is a random-access grain source over the
shards of one split:

  * window w of a shard with T tokens is tokens[w*seq_len : w*seq_len + seq_len + 1] (stride seq_len, so
    every token but the shard's first is a target exactly once); a shard has (T - 1) // seq_len windows and
    windows never cross shards (the tail of each shard, < seq_len tokens, is unused);
  * windows are numbered globally in manifest order through cumulative counts (window i lives in shard
    k = bisect(cum, i) - 1, at token (i - cum[k]) * seq_len); `start`/`stop` select a contiguous range of
    that numbering (the held-out tail when a manifest has no validation shards);
  * `len()` comes from the manifest's token counts: building the source reads no data.

Reads: local shards are `np.memmap`s (little-endian dtype from the manifest) opened on first use; gs://
shards are ranged GETs of exactly a window's bytes (gcsfs `cat_file(start, end)`), and `read_many` fetches
a whole batch's windows concurrently (gcsfs `cat_ranges`: one asyncio gather). The filesystem object and
memmaps are created lazily per process and dropped when pickled, so the source pickles for grain workers.

`check_shards` is the start-up check: every shard present with exactly tokens * itemsize bytes (one stat per
local shard / one listing per gs:// folder), and with `verify="sha256"` each shard's sha256 against the
manifest, the shards split over processes (process p hashes shards[p::P]) and the verdicts all-gathered so
every process raises the same error.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import hashlib
import os
import time
from collections.abc import Sequence

import numpy as np

from vffn_jax import storage
from vffn_jax.config import ConfigError
from vffn_jax.data.manifest import Manifest, Shard

VERIFY_MODES = ("sha256", "size")
HASH_CHUNK = 8 << 20  # bytes per read while hashing
HASH_THREADS = 8  # shards hashed concurrently by one process (hashlib releases the GIL)
_VERIFIED: set[tuple[str, int, str]] = set()  # (url, size, sha256) already hashed by this process
LAST_VERIFY: dict = {}  # cost of the latest check_shards call in this process (bytes hashed, seconds)




def shard_url(m: Manifest, shard: Shard) -> str:
    return str(m.folder / shard.file)


class ShardWindows:
    """grain source: element i = window i (int32, seq_len + 1 tokens) of the given shards, see module doc."""

    def __init__(self, files: Sequence[str], tokens: Sequence[int], dtype, seq_len: int, *,
                 start: int = 0, stop: int | None = None, label: str = "shards"):
        if len(files) != len(tokens):
            raise ValueError("one token count per shard file")
        self._files = [str(f) for f in files]
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._seq_len = int(seq_len)
        counts = [max(0, (int(t) - 1) // self._seq_len) for t in tokens]
        self._tokens = [int(t) for t in tokens]
        self._cum = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        total = self._cum[-1]
        self._start, self._stop = int(start), total if stop is None else int(stop)
        if not 0 <= self._start <= self._stop <= total:
            raise ValueError(f"window range [{start}, {stop}) outside [0, {total}]")
        self.label = label
        self._gcs = any(storage.is_gcs(f) for f in self._files)
        self._fs = None
        self._maps: dict[int, np.memmap] = {}

    @classmethod
    def from_manifest(cls, m: Manifest, shards: Sequence[Shard], seq_len: int, **kw) -> "ShardWindows":
        return cls([shard_url(m, s) for s in shards], [s.tokens for s in shards], m.np_dtype, seq_len,
                   label=kw.pop("label", str(m.folder)), **kw)

    @property
    def n_windows_total(self) -> int:
        """Windows of all shards, before the start/stop range."""
        return self._cum[-1]

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def is_gcs(self) -> bool:
        return self._gcs

    def with_range(self, start: int, stop: int) -> "ShardWindows":
        return ShardWindows(self._files, self._tokens, self._dtype, self._seq_len, start=start, stop=stop,
                            label=self.label)

    def __len__(self) -> int:
        return self._stop - self._start

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, first token) of window i."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} outside [0, {len(self)})")
        g = i + self._start
        k = bisect.bisect_right(self._cum, g) - 1
        return k, (g - self._cum[k]) * self._seq_len

    def _memmap(self, k: int) -> np.memmap:
        mm = self._maps.get(k)
        if mm is None:
            mm = self._maps[k] = np.memmap(self._files[k], dtype=self._dtype, mode="r", shape=(self._tokens[k],))
        return mm

    def _filesystem(self):
        if self._fs is None:
            self._fs = storage.gcs_fs()
        return self._fs

    def _decode(self, raw: bytes, k: int, first: int) -> np.ndarray:
        n = self._seq_len + 1
        if len(raw) != n * self._dtype.itemsize:
            raise OSError(f"{self._files[k]}: read {len(raw)} bytes at token {first}, expected "
                          f"{n * self._dtype.itemsize}; the shard changed since start-up (re-copy it)")
        return np.frombuffer(raw, dtype=self._dtype).astype(np.int32)

    def __getitem__(self, i: int) -> np.ndarray:
        k, first = self.locate(i)
        n = self._seq_len + 1
        if storage.is_gcs(self._files[k]):
            # exactly the window's bytes (end is exclusive)
            size = self._dtype.itemsize
            raw = self._filesystem().cat_file(self._files[k], start=first * size, end=(first + n) * size)
            return self._decode(raw, k, first)
        return np.asarray(self._memmap(k)[first:first + n], dtype=np.int32)

    def read_many(self, indices: Sequence[int]) -> np.ndarray:
        """[len(indices), seq_len + 1] int32: the windows, gs:// ones fetched concurrently."""
        n, size = self._seq_len + 1, self._dtype.itemsize
        where = [self.locate(i) for i in indices]
        out = np.empty((len(where), n), np.int32)
        remote = []
        for j, (k, first) in enumerate(where):
            if self._gcs and storage.is_gcs(self._files[k]):
                remote.append(j)
            else:
                out[j] = self._memmap(k)[first:first + n]
        if remote:
            paths = [self._files[where[j][0]] for j in remote]
            starts = [where[j][1] * size for j in remote]
            raws = self._filesystem().cat_ranges(paths, starts, [s + n * size for s in starts], on_error="raise")
            for j, raw in zip(remote, raws):
                out[j] = self._decode(raw, *where[j])
        return out

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_maps": {}}

    def __repr__(self) -> str:
        return (f"ShardWindows({self.label}, shards={len(self._files)}, windows=[{self._start}, {self._stop}), "
                f"seq_len={self._seq_len})")


# --------------------------------------------------------------------------- start-up checks


def _sizes(m: Manifest, shards: Sequence[Shard]) -> dict[str, int | None]:
    """url -> size in bytes (None = missing): one stat per local shard, one listing per gs:// folder."""
    urls = [shard_url(m, s) for s in shards]
    if not storage.is_gcs(str(m.folder)):
        out = {}
        for u in urls:
            try:
                out[u] = os.stat(u).st_size
            except FileNotFoundError:
                out[u] = None
        return out
    fs = storage.gcs_fs()
    try:
        listing = fs.find(str(m.folder), detail=True)
    except FileNotFoundError:
        listing = {}
    sizes = {storage.GCS_PREFIX + name.removeprefix(storage.GCS_PREFIX): int(info["size"])
             for name, info in listing.items() if info.get("type") == "file"}
    return {u: sizes.get(u) for u in urls}


def _sha256(url: str) -> str:
    h = hashlib.sha256()
    if storage.is_gcs(url):
        with storage.gcs_fs().open(url, "rb", block_size=HASH_CHUNK, cache_type="none") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    else:
        with open(url, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _allgather_max(codes: np.ndarray) -> np.ndarray:
    import jax

    if jax.process_count() == 1:
        return codes
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(codes)).reshape(jax.process_count(), -1).max(axis=0)


def check_shards(m: Manifest, shards: Sequence[Shard], verify: str = "sha256") -> None:
    """FileNotFoundError for a missing shard, ConfigError for a wrong size or (verify="sha256") a sha256
    that differs from the manifest; each message names the shard, the manifest and the fix.

    The sha256 pass is split over this job's processes (`jax.process_index()::jax.process_count()`) and its
    verdicts are all-gathered (a collective: every process must call this with the same shards)."""
    if verify not in VERIFY_MODES:
        raise ConfigError(f"data.verify_shards={verify!r}: choose one of {VERIFY_MODES}")
    itemsize = m.np_dtype.itemsize
    sizes = _sizes(m, shards)
    fix = (f"copy the whole folder {m.folder} again (gcloud storage cp -r / rsync), or re-run "
           "`python -m vffn_jax.data tokenize` into it")
    for s in shards:
        url = shard_url(m, s)
        if sizes[url] is None:
            raise FileNotFoundError(f"shard {url} listed in {m.path} is missing; {fix}")
        if sizes[url] != s.tokens * itemsize:
            raise ConfigError(f"shard {url} has {sizes[url]:,} bytes but {m.path} lists {s.tokens:,} {m.dtype} tokens "
                              f"= {s.tokens * itemsize:,} bytes (truncated or from another run); {fix}")
    if verify != "sha256":
        return
    import jax

    todo = [j for j, s in enumerate(shards) if (shard_url(m, s), s.tokens, s.sha256) not in _VERIFIED]
    if not todo:
        return
    mine = todo[jax.process_index()::jax.process_count()]
    codes = np.zeros(len(shards), np.int32)  # 0 ok / not mine, 1 sha256 differs, 2 unreadable
    errors: dict[int, str] = {}
    t0 = time.perf_counter()

    def one(j: int) -> tuple[int, str | Exception]:
        try:
            return j, _sha256(shard_url(m, shards[j]))
        except Exception as e:  # noqa: BLE001 - reported (the same way on every process) below
            return j, e

    with concurrent.futures.ThreadPoolExecutor(max(1, min(HASH_THREADS, len(mine)))) as pool:
        for j, got in pool.map(one, mine):
            if isinstance(got, Exception):
                codes[j], errors[j] = 2, f"{type(got).__name__}: {got}"
            elif got != shards[j].sha256:
                codes[j], errors[j] = 1, got
    LAST_VERIFY.update(bytes=sum(shards[j].tokens * itemsize for j in mine), seconds=time.perf_counter() - t0,
                       shards=len(mine))
    codes = _allgather_max(codes)
    for j in np.flatnonzero(codes):
        s, url = shards[j], shard_url(m, shards[j])
        if codes[j] == 1:
            raise ConfigError(f"shard {url}: its sha256 differs from the one in {m.path} ({s.sha256}): the file was "
                              f"changed or damaged after tokenising; {fix}. (data.verify_shards=size skips this "
                              "check)")
        raise OSError(f"shard {url} listed in {m.path} could not be read to verify it "
                      f"({errors.get(j, 'on another process')}); {fix}")
    _VERIFIED.update((shard_url(m, shards[j]), shards[j].tokens, shards[j].sha256) for j in todo)
