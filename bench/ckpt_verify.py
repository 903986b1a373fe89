#!/usr/bin/env python
"""What checkpoint checksums cost at the 354m scale: save, checksum writing and verification side by side.

Builds the 354m versatile parameters and their AdamW state (f32, as a real run keeps them) abstractly,
fills them with random numbers on the CPU, saves one step with `checkpoint.save` to a temporary local
folder, and prints: the save's time to commit (Orbax), the checksums' time (listing + crc32c of every
file + writing the JSON, in the background after the commit), the verification a restore does first
(params + optimizer state: listing, sizes, crc32c), bytes and GB/s. Files just written sit in the page
cache, so hashing reads memory, as it would right after a save; a cold restore also pays the disk read.

    python bench/ckpt_verify.py [--scale 354m] [--variant versatile] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="354m")
    p.add_argument("--variant", default="versatile")
    p.add_argument("--dir", default=None, help="parent of the temporary checkpoint folder (default: the system's)")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax import config as config_lib
    from vffn_jax.model import placement
    from vffn_jax.train import optimizer

    cfg = config_lib.load_config(args.scale, args.variant)
    _, abstract_params = placement.abstract_model(cfg.model)
    tx = optimizer.make_optimizer(cfg.train)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)

    rng = np.random.default_rng(0)
    t = time.perf_counter()

    def fill(a):
        if not hasattr(a, "shape"):
            return a
        if np.issubdtype(a.dtype, np.floating):
            return jax.device_put(rng.standard_normal(a.shape, dtype=np.float32).astype(a.dtype))
        return jax.device_put(np.zeros(a.shape, a.dtype))

    params = jax.tree.map(fill, abstract_params)
    opt_state = jax.tree.map(fill, abstract_opt)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))  # noqa: E731
    p_bytes, o_bytes = nbytes(params), nbytes(opt_state)
    print(f"{args.scale}/{args.variant}: params {p_bytes / 1e9:.2f} GB + optimizer state {o_bytes / 1e9:.2f} GB "
          f"(f32), filled in {time.perf_counter() - t:.1f} s", flush=True)

    root = tempfile.mkdtemp(prefix="ckpt_verify-", dir=args.dir)
    try:
        manager = ckpt.make_manager(root)
        t0 = time.perf_counter()
        ckpt.save(manager, 1, params, opt_state, force=True)
        t_blocking = time.perf_counter() - t0
        manager.wait_until_finished()
        t_commit = time.perf_counter() - t0
        ckpt.wait_until_finished(manager)
        t_digests_done = time.perf_counter() - t0
        stats = ckpt.last_digest_stats(manager)
        del params, opt_state

        t1 = time.perf_counter()
        verdict = ckpt.verify_step(manager, 1, ("params", "opt_state"))
        t_verify = time.perf_counter() - t1
        t2 = time.perf_counter()
        v_params = ckpt.verify_step(manager, 1, ("params",))
        t_verify_params = time.perf_counter() - t2
        assert verdict.status == v_params.status == "verified", (verdict, v_params)

        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        rows = [
            ("save: blocking part (device->host)", t_blocking, None),
            ("save: to commit (Orbax, async)", t_commit, on_disk),
            ("checksums after commit (crc32c, all files)", stats.seconds, stats.bytes),
            ("  their extra wall time after commit", t_digests_done - t_commit, None),
            ("verify at restore: params + opt_state", t_verify, verdict.bytes),
            ("verify at restore: params only (eval)", t_verify_params, v_params.bytes),
        ]
        print(f"checkpoint on disk: {on_disk / 1e9:.2f} GB in {stats.files} files   ({root})")
        print(f"{'':46s} {'seconds':>8s} {'GB':>7s} {'GB/s':>6s}")
        for name, sec, b in rows:
            gb = f"{b / 1e9:7.2f}" if b else " " * 7
            rate = f"{b / 1e9 / sec:6.2f}" if b and sec > 0 else ""
            print(f"{name:46s} {sec:8.2f} {gb} {rate}")
        print(f"checksums add {100 * stats.seconds / t_commit:.0f}% to the save's commit time (in the background; "
              "training is blocked only if the next save comes first)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
