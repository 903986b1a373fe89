"""Batches: token windows of a split -> packed, shuffled, per-process grain batches; the end of the pipeline

    sources.py (read documents) -> tokenize_corpus.py (the engine) -> shard_writer.py -> manifest.json
    -> shard_reader.py (windows of shards) -> batches.py (this module)

What `data.path` names, and how its two splits are read:
  FOLDER | FOLDER/manifest.json  a token-shard corpus (`vffn-tokenize`), local or gs://, read in place: train =
                              its "train" shards, validation = its "validation" shards; a manifest without
                              validation shards holds out the last `holdout_fraction` of its train windows
                              (windows, in manifest order). Windows (seq_len + 1 tokens at stride seq_len) never
                              cross shards. gs:// windows are ranged reads of exactly their bytes, a batch's
                              windows fetched concurrently; a process reads only its own rows.
  raw documents ("" = the default corpus, tfds:..., files, folders, globs, local or gs://)
                              tokenised once by the same engine into the local cache (vffn_jax/data/token_cache.py)
                              and read as the manifest it writes: the same batches as `vffn-tokenize` and
                              data.path=its output. Held-out documents: vffn_jax/data/splits.py.
  a .npy / .bin token file    memory-mapped (PackedWindows); the last holdout_fraction of tokens is validation.
  synthetic                   random windows, no files (vffn_jax/data/synthetic.py), for performance work.
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
Every document is followed by the tokenizer's EOS. Batches are windows of seq_len + 1 tokens at stride
seq_len, shuffled per epoch by grain; global batch b is a pure function of (seed, b) and does not depend on
the number of processes, each of which gets a contiguous block of its rows.

Start-up checks for manifests (ConfigError / FileNotFoundError naming the file and the fix): the manifest's
tokenizer vs data.tokenizer (`check_corpus`, which also takes the model's vocab size), every shard present
with exactly tokens * itemsize bytes, and with data.verify_shards="sha256" (default) each shard's sha256,
hashed once per process and split over processes (`shard_reader.check_shards`); "size" skips the hashing
(the token cache, which this process wrote, is checked by size).
"""
from __future__ import annotations

import hashlib

import grain
import numpy as np

from vffn_jax.config import ConfigError, DataConfig
from vffn_jax.data import manifest as manifest_lib
from vffn_jax.data import splits, synthetic, token_cache, token_files
from vffn_jax.data.default_corpus import prepare_default_corpus
from vffn_jax.data.shard_reader import ShardWindows, check_shards
from vffn_jax.data.splits import SPLITS, check_split as _check_split
from vffn_jax.data.tokenizer import load_tokenizer

_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_READ_GCS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=8)  # batches in flight for ranged gs:// reads


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


def _split_windows(cfg: DataConfig, m: manifest_lib.Manifest, split: str, seq_len: int,
                   verify: str | None = None, what: str = "") -> ShardWindows:
    """The windows of `split` of one manifest, after checking its shards (a collective on several processes
    with verify="sha256"; default data.verify_shards). Errors name `what` (default: the manifest)."""
    what = what or str(m.path)
    train, val = m.split_shards("train"), m.split_shards("validation")
    if not train:
        raise ConfigError(f"{what} has no 'train' shards (splits: {sorted(m.splits())}); re-tokenise with a train split")
    if val:
        shards, rng = (val if split == "validation" else train), None
    else:  # the held-out tail of the train windows, by the same rule as sources without a split
        shards = train
        n = ShardWindows.from_manifest(m, train, seq_len).n_windows_total
        if n < 1:
            raise ConfigError(f"{what}: no train shard holds one sequence of seq_len + 1 = {seq_len + 1} tokens; "
                              "lower train.seq_len, or use more data (or larger shards)")
        rng = splits.tail_range(n, split, cfg.holdout_fraction, what, "windows")
    check_shards(m, shards, verify or cfg.verify_shards)
    src = ShardWindows.from_manifest(m, shards, seq_len)
    if rng is not None:
        src = src.with_range(*rng)
    if len(src) < 1:
        raise ConfigError(f"the {split} shards of {what} hold no sequence of seq_len + 1 = {seq_len + 1} tokens "
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


def batch_dataset(tokens: np.memmap | ShardWindows | list[ShardWindows] | synthetic.SyntheticWindows, *, seq_len: int, global_batch: int,
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


def _raw_source(cfg: DataConfig, split: str, seq_len: int) -> np.memmap | ShardWindows | synthetic.SyntheticWindows:
    """`split` of a data.path that is not a manifest: synthetic windows, the tokens of a .npy / .bin file, or
    the windows of the token cache that the engine writes for raw documents."""
    _check_split(split)
    if synthetic.is_synthetic(cfg.path):
        return synthetic.SyntheticWindows(load_tokenizer(cfg.tokenizer).vocab_size, seq_len, cfg.shuffle_seed, split)
    if token_files.is_token_file(cfg.path):
        return token_files.split_view(cfg, split)
    corpus = token_cache.cached_corpus(cfg)
    return _split_windows(cfg, corpus, split, seq_len, verify="size",
                          what=f"{token_cache.describe(cfg)} (tokenised into {corpus.folder})")


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
        tokens, weights = _raw_source(cfg, split, seq_len), None
        shuffle = shuffle and not synthetic.is_synthetic(cfg.path)  # random already; a shuffle would cost time
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
        tokens, weights = _raw_source(cfg, "validation", seq_len), None
    ds = batch_dataset(tokens, seq_len=seq_len, global_batch=global_batch, seed=None, repeat=False,
                       process_index=process_index, process_count=process_count, weights=weights)
    return [ds[i] for i in range(min(n_batches, len(ds)))]


# --------------------------------------------------------------------------- the default corpus, described


def describe_default_corpus(cache_dir: str = "", tokenizer: str = "byte") -> list[str]:
    """Builds the default corpus (idempotent), tokenises both splits into the cache; one line per split."""
    import tensorflow_datasets as tfds

    out = prepare_default_corpus(cache_dir)
    info = tfds.builder_from_directory(out).info
    cfg = DataConfig(tokenizer=tokenizer, cache_dir=cache_dir)
    lines = [f"default corpus: {out}"]
    for split in SPLITS:
        n_tokens = len(token_cache.split_tokens(cfg, split))
        lines.append(f"{split}: {info.splits[split].num_examples:,} documents, {n_tokens:,} tokens ({tokenizer})")
    return lines
