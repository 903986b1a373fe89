#!/usr/bin/env python
"""Throughput of the token-shard loader alone, beside the tokens/s one chip consumes at 354m.

Writes a corpus of random tokens (uint16, --size-mb in shards of --shard-mb) with its manifest.json to
a temporary folder and, separately, uploads it to a fake-gcs-server bucket this script starts itself
(`vffn_jax.gcs_emulator.GcsEmulator`, loopback: no network latency or bandwidth limit, so the gs:// figure
measures the client side: request overhead and CPU). Then, for each location, times:

  * the start-up check (`shards.check_shards`, sha256 of every shard): GB/s on this process;
  * the loader: `data.make_batch_iterator` as the trainer builds it (grain read-ahead, a batch's gs://
    windows fetched concurrently), for one process of --processes
    (default 16, the 354m run's 384 sequences on a v5p-128's 16 hosts = 24 rows per process), seq_len 4096,
    after --warmup batches; tokens/s per process = rows * seq_len * batches / seconds.

The chip's consumption: `flops.flops_per_token(load_config("354m", "versatile").model, 4096, train=True)`
and 50% MFU of the peak in `perf/chips.py`; the target is loader >= 20x one chip.
Local shards are read right after being written (page cache): a cold disk adds its own read time.

  python bench/data_loader.py                 # ~300 MB corpus
  python bench/data_loader.py --size-mb 64 --batches 50 --json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: the repo root holds vffn_jax

import numpy as np  # noqa: E402

TARGET = 20.0
MFU = 0.5
CHIPS = ("tpu v5p", "tpu v5e", "tpu v4", "tpu v6")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=300, help="corpus size in MB (default 300)")
    p.add_argument("--shard-mb", type=int, default=64, help="shard size in MB (default 64)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=384, help="the 354m run's global batch (sequences)")
    p.add_argument("--processes", type=int, default=16, help="processes the global batch is split over")
    p.add_argument("--batches", type=int, default=100, help="timed batches per location")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--skip-gcs", action="store_true", help="local shards only")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def tokenizer_entry(spec: str) -> dict:
    """The manifest's tokenizer entry for data.tokenizer=`spec` (OLMo's when installed, else the byte one)."""
    from vffn_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    return {"name": tok.name, "spec": spec, "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}


def write_corpus(folder: Path, size_mb: int, shard_mb: int, tokenizer: dict):
    from vffn_jax.data.manifest import Manifest, Shard

    rng = np.random.default_rng(0)
    per_shard, left, shards, i = shard_mb * (1 << 20) // 2, size_mb * (1 << 20) // 2, [], 0
    while left > 0:
        n = min(per_shard, left)
        raw = rng.integers(0, tokenizer["vocab_size"], n, dtype=np.uint16).astype("<u2").tobytes()
        name = f"train-00000-{i:04d}.bin"
        (folder / name).write_bytes(raw)
        shards.append(Shard(name, "train", n, 1, hashlib.sha256(raw).hexdigest()))
        left, i = left - n, i + 1
    m = Manifest(folder, tokenizer, "uint16", tuple(shards))
    (folder / "manifest.json").write_text(m.to_json())
    return m


def upload(folder: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("gs")
    for f in sorted(folder.iterdir()):
        fs.put_file(str(f), f"{url}/{f.name}")


def measure(path: str, args) -> dict:
    from vffn_jax.data import batches as data_lib
    from vffn_jax.data import shard_reader as shards_lib
    from vffn_jax.config import DataConfig
    from vffn_jax.data.manifest import read_manifest

    m = read_manifest(path)
    shards_lib._VERIFIED.clear()
    t0 = time.perf_counter()
    shards_lib.check_shards(m, m.split_shards("train"), "sha256")
    verify_s = time.perf_counter() - t0
    n_bytes = sum(s.tokens for s in m.shards) * m.np_dtype.itemsize
    t0 = time.perf_counter()
    shards_lib.check_shards(m, m.split_shards("train"), "size")
    size_s = time.perf_counter() - t0

    cfg = DataConfig(path=path, tokenizer=m.tokenizer["spec"], verify_shards="size", holdout_fraction=0.0)
    rows = args.global_batch // args.processes
    it = data_lib.make_batch_iterator(cfg, "train", seq_len=args.seq_len, global_batch=args.global_batch, seed=0,
                                      process_index=args.processes // 2, process_count=args.processes)
    for _ in range(args.warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        b = next(it)
    loader_s = time.perf_counter() - t0
    it.close()  # stop grain's read-ahead before the emulator goes away
    time.sleep(1.0)  # reads already in flight finish
    assert b.shape == (rows, args.seq_len + 1)
    # for comparison: the same windows one ranged read at a time, no read-ahead and no concurrency
    (src,), _ = data_lib.shard_sources(cfg, "train", args.seq_len)
    n_seq = rows * max(2, args.batches // 10)
    t0 = time.perf_counter()
    for i in range(n_seq):
        src[(i * 7919) % len(src)]
    single_s = time.perf_counter() - t0
    return {"path": path, "corpus_bytes": n_bytes, "shards": len(m.shards),
            "verify_sha256_s": verify_s, "verify_sha256_gb_per_s": n_bytes / verify_s / 1e9,
            "verify_size_s": size_s, "rows_per_batch": rows, "batches": args.batches,
            "loader_tokens_per_s": rows * args.seq_len * args.batches / loader_s,
            "loader_batches_per_s": args.batches / loader_s,
            "single_reads_tokens_per_s": n_seq * args.seq_len / single_s}


def chips(seq_len: int) -> dict:
    from vffn_jax.config import load_config
    from vffn_jax.perf.chips import chip_for
    from vffn_jax.perf.flops import flops_per_token

    fpt = flops_per_token(load_config("354m", "versatile").model, seq_len, train=True)
    return {"flops_per_token": fpt,
            **{c: {"peak": chip_for(c).peak_flops, "tokens_per_s_at_50pct_mfu": MFU * chip_for(c).peak_flops / fpt} for c in CHIPS}}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    out = {"args": vars(args), "chips": chips(args.seq_len), "loader": {}}
    with tempfile.TemporaryDirectory(prefix="vffn-bench-shards-") as tmp:
        folder = Path(tmp) / "corpus"
        folder.mkdir()
        t0 = time.perf_counter()
        try:
            tokenizer = tokenizer_entry("olmo")
        except Exception:  # noqa: BLE001 - olmo_eval not installed: the ids are random anyway
            tokenizer = tokenizer_entry("byte")
        write_corpus(folder, args.size_mb, args.shard_mb, tokenizer)
        out["write_s"] = time.perf_counter() - t0
        out["loader"]["local"] = measure(str(folder), args)
        if not args.skip_gcs:
            from vffn_jax.testing.gcs_emulator import GcsEmulator

            with GcsEmulator() as emu:
                os.environ.update(emu.env)
                bucket = emu.create_bucket("bench-shards")
                t0 = time.perf_counter()
                upload(folder, f"{bucket}/corpus")
                out["upload_s"] = time.perf_counter() - t0
                out["loader"]["gcs (fake-gcs-server, loopback)"] = measure(f"{bucket}/corpus", args)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    c = out["chips"]
    print(f"354m/versatile, seq_len {args.seq_len}: {c['flops_per_token'] / 1e9:.2f} GFLOP/token (train); "
          f"one chip at {MFU:.0%} MFU consumes:")
    for chip in CHIPS:
        print(f"  {chip:8s} peak {c[chip]['peak'] / 1e12:4.0f} TFLOP/s -> {c[chip]['tokens_per_s_at_50pct_mfu']:>9,.0f} tokens/s")
    print(f"\nloader, one process of {args.processes} ({args.global_batch // args.processes} x {args.seq_len} tokens "
          f"per batch), corpus {args.size_mb} MB in {args.shard_mb} MB shards:")
    print(f"  {'location':34s} {'tokens/s':>12s} {'batches/s':>9s}  " + "  ".join(f"x {ch[4:]:>4s}" for ch in CHIPS[:2])
          + "   sha256 check")
    for where, r in out["loader"].items():
        ratios = [r["loader_tokens_per_s"] / c[ch]["tokens_per_s_at_50pct_mfu"] for ch in CHIPS[:2]]
        print(f"  {where:34s} {r['loader_tokens_per_s']:>12,.0f} {r['loader_batches_per_s']:>9.1f}  "
              + "  ".join(f"{x:6.1f}" for x in ratios)
              + f"   {r['verify_sha256_gb_per_s']:.2f} GB/s ({r['verify_sha256_s']:.1f} s; size only {r['verify_size_s'] * 1e3:.0f} ms)")
    print(f"  target: loader >= {TARGET:.0f}x one chip")
    print("  without read-ahead or concurrent reads (one window at a time, src[i]): "
          + ", ".join(f"{w} {r['single_reads_tokens_per_s']:,.0f} tokens/s" for w, r in out["loader"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
