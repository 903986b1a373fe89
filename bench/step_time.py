#!/usr/bin/env python
"""Training-step time, FLOP ratio, MFU and peak memory of dense and versatile, at the tiny and the wide shape,
in one run.

Measures `step_lib.make_train_step` only, on batches of the synthetic source (`data.path=synthetic`: random
tokens, no files) already on the devices: no data pipeline, checkpointing or logging in the figure.

Time. Every (shape, variant) is compiled and warmed up first; then each shape's variants are timed in
interleaved rounds (round r runs --steps steps of each in turn), so machine noise hits them alike; a shape's
rounds all run before the next shape's, so one shape's buffers never evict the other's between variants. Each
step is timed to completion (`block_until_ready`). Per round, a variant's time ratio to dense at the same shape,
divided by the analytic training-FLOP ratio (`flops.flops_per_token(..., train=True)`: matmuls only), gives its
time/FLOPs; the table reports the median over rounds and the spread (min..max). 1.0 means the variant's extra
FLOPs cost exactly their share of time; the target for versatile is <= 1.1 at every shape.
MFU is model FLOPs per second over the device peak: the chip table's on TPU/GPU, a measured float32
matmul on CPU (`run.peak_flops=-1`).

Memory (`--remat`, default none,dots,full; `--remat ''` skips it). Each (shape, variant, remat policy) runs
in its own child process, which compiles the step, runs a warm-up step, then reports the peak memory of
--steps further steps: on CPU the process's peak resident set (VmHWM, reset after the warm-up through
/proc/self/clear_refs, so compilation is not counted), on GPU/TPU the device's `peak_bytes_in_use` (since the
process started; the warm-up step peaks as high as the others). Beside it, XLA's `memory_analysis` temporaries.

Shapes (batch 8, 4 layers, float32, E=8 k=2 L=4 for versatile):
  tiny  the `tiny` preset: d_model 128, 4 heads, d_ff 512, seq 128, vocab 384
  wide  d_model 512, 8 heads, d_ff 2048, seq 256

Examples:
  python bench/step_time.py                          # both shapes, dense + versatile, memory per remat policy
  python bench/step_time.py --shapes tiny --remat '' --rounds 3
  python bench/step_time.py --variants dense,versatile,kloop --moe
  python bench/step_time.py --grad-accum 1,4 --shapes tiny
  python bench/step_time.py --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: the repo root holds vffn_jax

from vffn_jax import config as config_lib  # noqa: E402

SHAPES = {
    "tiny": {},
    "wide": {"model.d_model": 512, "model.n_heads": 8, "model.d_ff": 2048, "train.seq_len": 256},
}
EXTRA = {"kloop": {"model.n_loops": 4}}  # the variant's own settings (kloop-4: the routing-free depth baseline)
TARGET = 1.1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny",
                   help=f"scale preset {config_lib.available('scales')} or a JSON config path the shapes start "
                        "from. Default: tiny")
    p.add_argument("--shapes", default="tiny,wide",
                   help=f"comma-separated shapes from {sorted(SHAPES)} (see above). Default: tiny,wide")
    p.add_argument("--variants", default="dense,versatile",
                   help="comma-separated variants; dense is always timed (the reference). Default: dense,versatile")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for every shape and variant, e.g. --set train.batch_size=16 "
                        "(repeatable)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round. Default: 3")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the spread is over rounds. Default: 7")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after compiling. Default: 1")
    p.add_argument("--remat", default="none,dots,full", metavar="POLICY[,POLICY...]",
                   help="model.remat policies to measure peak memory for, each in a child process ('' to skip). "
                        "Default: none,dots,full")
    p.add_argument("--grad-accum", default="1", metavar="N[,N...]",
                   help="train.grad_accum values to time each variant at (e.g. 1,4); the global batch stays "
                        "train.batch_size. Default: 1")
    p.add_argument("--attention", default="auto", metavar="KIND[,KIND...]",
                   help="model.attention kernels to time each variant with (auto, xla, splash, cudnn). Off TPU "
                        "splash runs in Pallas interpret mode: correct, not fast")
    p.add_argument("--moe", action="store_true",
                   help="also time the moe baseline (its dense dispatch runs all E experts: time/FLOPs well above 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--no-cache", action="store_true",
                   help="do not use the persistent compilation cache (.jax_cache/ in the repo root, shared with the "
                        "tests); with it, reruns skip most of the compile time")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    return p


def split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def shape_overrides(shape: str, variant: str, args, **more) -> dict:
    if shape not in SHAPES:
        raise config_lib.ConfigError(f"--shapes: unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    return {**SHAPES[shape], **EXTRA.get(variant, {}), **config_lib.parse_set_args(args.overrides), **more}


def prepare(cfg, n_batches: int = 2):
    """(compiled step, params, opt_state, device batches, setup, compile seconds) for one config."""
    import dataclasses

    import jax

    from vffn_jax.data import batches as data_lib
    from vffn_jax.model import placement
    from vffn_jax.parallel import sharding as shd
    from vffn_jax.train import optimizer
    from vffn_jax.train import step as step_lib

    s = placement.setup(cfg)
    tx = optimizer.make_optimizer(cfg.train)
    _, opt_shardings = optimizer.opt_state_shardings(tx, s)
    params, opt_state = optimizer.init_train_state(s, tx, opt_shardings)
    step = step_lib.make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_shardings)
    data = data_lib.make_batch_iterator(dataclasses.replace(cfg.data, path="synthetic"), "train",
                                        seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                                        seed=cfg.train.seed)
    batches = [jax.device_put(next(data), shd.batch_sharding(s.mesh)) for _ in range(n_batches)]
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batches[0], jax.numpy.asarray(0, jax.numpy.int32)).compile()
    return compiled, params, opt_state, batches, s, time.perf_counter() - t0


def temp_bytes(compiled) -> int | None:
    """The compiled step's temporary memory per device (None where the backend does not report it)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        return None


class Runner:
    """One compiled step and its state; `run(n)` advances it n steps and returns their wall times."""

    def __init__(self, cfg):
        import jax.numpy as jnp

        self.cfg = cfg
        self.step, self.params, self.opt, self.batches, self.setup, self.compile_s = prepare(cfg)
        self.temp_bytes = temp_bytes(self.step)
        self.n = 0
        self._counter = lambda i: jnp.asarray(i, jnp.int32)

    def run(self, n: int) -> list[float]:
        import jax

        times = []
        for _ in range(n):
            batch, counter = self.batches[self.n % len(self.batches)], self._counter(self.n)
            t0 = time.perf_counter()
            self.params, self.opt, metrics = self.step(self.params, self.opt, batch, counter)
            jax.block_until_ready((self.params, self.opt, metrics))
            times.append(time.perf_counter() - t0)
            self.n += 1
        return times


# --------------------------------------------------------------------------- peak memory (one child per config)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _release_free_host_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the allocator's free pages back, so they leave the RSS
    except (OSError, AttributeError):
        pass


def memory_child(spec: dict) -> dict:
    """Peak memory of `spec['steps']` training steps of one config, compilation and warm-up excluded."""
    import jax

    cfg = config_lib.load_config(spec["config"], spec["variant"], spec["overrides"])
    runner = Runner(cfg)
    runner.run(1)  # warm-up: the first call also allocates the executable's buffers
    device = jax.devices()[0]
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((runner.params, runner.opt)))
    if device.platform == "cpu":
        _release_free_host_memory()
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        runner.run(spec["steps"])
        peak = _status_kib("VmHWM") * 1024
        return {"peak_bytes": peak, "peak_over_start_bytes": peak - before * 1024, "state_bytes": state_bytes,
                "temp_bytes": runner.temp_bytes, "measure": "host RSS (VmHWM)"}
    runner.run(spec["steps"])
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"peak_bytes": peak, "peak_over_start_bytes": None, "state_bytes": state_bytes,
            "temp_bytes": runner.temp_bytes, "measure": "device peak_bytes_in_use"}


def measure_memory(args, shape: str, variant: str, remat: str) -> dict:
    spec = {"config": args.config, "variant": variant, "steps": max(args.steps, 2),
            "overrides": shape_overrides(shape, variant, args, **{"model.remat": remat})}
    argv = [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)]
    if args.no_cache:
        argv.append("--no-cache")
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- the timed comparison


def run(args) -> dict:
    import jax

    from vffn_jax.perf import flops as flops_lib
    from vffn_jax.train import goodput

    shapes, kernels = split(args.shapes), split(args.attention)
    try:
        accums = [int(v) for v in split(args.grad_accum)]
    except ValueError:
        raise config_lib.ConfigError(f"--grad-accum {args.grad_accum!r}: give positive integers, e.g. 1,4") from None
    variants = ["dense"] + [v for v in split(args.variants) if v != "dense"] + (["moe"] if args.moe else [])
    if not shapes or not accums or min(accums) < 1 or not kernels:
        raise config_lib.ConfigError("--shapes, --grad-accum (positive integers) and --attention need a value each")
    keys = [(shape, v, a, k) for shape in shapes for k in kernels for a in accums for v in variants]
    runners = {}
    for shape, variant, accum, kernel in keys:
        cfg = config_lib.load_config(args.config, variant, shape_overrides(
            shape, variant, args, **{"train.grad_accum": accum, "model.attention": kernel}))
        runners[(shape, variant, accum, kernel)] = Runner(cfg)
    for r in runners.values():
        r.run(args.warmup)
    per_round = {key: [] for key in keys}  # mean step time of each round
    for shape in shapes:  # rounds interleave the variants of one shape; one shape's rounds, then the next
        for _ in range(args.rounds):
            for key in (k for k in keys if k[0] == shape):
                per_round[key].append(statistics.fmean(runners[key].run(args.steps)))

    peak = goodput.resolve_peak_flops(-1 if jax.devices()[0].platform == "cpu" else 0)
    n_devices = jax.device_count()
    rows = []
    for key in keys:
        shape, variant, accum, kernel = key
        r, dense_key = runners[key], (shape, "dense", accum, kernel)
        cfg = r.cfg
        fpt = flops_lib.flops_per_token(cfg.model, cfg.train.seq_len, train=True)
        flop_ratio = fpt / flops_lib.flops_per_token(runners[dense_key].cfg.model, cfg.train.seq_len, train=True)
        quotients = [t / td / flop_ratio for t, td in zip(per_round[key], per_round[dense_key])]
        med = statistics.median(per_round[key])
        tokens = cfg.train.batch_size * cfg.train.seq_len
        rows.append({
            "shape": shape, "variant": variant if variant != "kloop" else f"kloop-{cfg.model.n_loops}",
            "grad_accum": accum, "attention": kernel, "remat": cfg.model.remat,
            "median_step_s": med, "min_step_s": min(per_round[key]), "tokens_per_s": tokens / med,
            "flops_per_token_train": fpt, "flop_ratio_vs_dense": flop_ratio,
            "time_ratio_vs_dense": med / statistics.median(per_round[dense_key]),
            "time_over_flop_ratio": statistics.median(quotients),
            "time_over_flop_ratio_min": min(quotients), "time_over_flop_ratio_max": max(quotients),
            "mfu": None if not peak else fpt * tokens / med / (peak * n_devices),
            "temp_bytes": r.temp_bytes, "compile_s": r.compile_s, "rounds": len(quotients),
        })
    memory = []
    for policy in split(args.remat):
        for shape in shapes:
            for variant in variants:
                memory.append({"shape": shape, "variant": variant, "remat": policy,
                               **measure_memory(args, shape, variant, policy)})
    first = runners[keys[0]]
    verdicts = {row["shape"]: row["time_over_flop_ratio"] <= TARGET for row in rows
                if row["variant"] == "versatile" and row["grad_accum"] == accums[0] and row["attention"] == kernels[0]}
    return {
        "config": args.config, "overrides": args.overrides, "shapes": {s: SHAPES[s] for s in shapes},
        "devices": f"{n_devices} x {jax.devices()[0].device_kind}", "jax": jax.__version__,
        "mesh": dict(zip(first.setup.mesh.axis_names, (int(x) for x in first.setup.mesh.devices.shape))),
        "peak_flops_per_device": peak, "peak_source": "measured f32 matmul" if jax.devices()[0].platform == "cpu"
        else "chip table", "rounds": args.rounds, "steps_per_round": args.steps, "rows": rows, "memory": memory,
        "target": TARGET, "versatile_meets_target": verdicts,
    }


def print_tables(r: dict) -> None:
    peak = r["peak_flops_per_device"]
    print(f"training step, jax {r['jax']}, {r['devices']} mesh {r['mesh']}; {r['rounds']} interleaved rounds x "
          f"{r['steps_per_round']} steps; synthetic batches; MFU vs "
          + (f"{peak / 1e9:.1f} GFLOP/s per device ({r['peak_source']})" if peak else "no known peak"))
    for name, over in r["shapes"].items():
        print(f"  {name}: {r['config']} preset" + (" with " + " ".join(f"{k}={v}" for k, v in over.items()) if over
                                                    else "") + (" " + " ".join(r["overrides"]) if r["overrides"] else ""))
    print()
    print(f"  {'shape':<5} {'variant':<10} {'accum':>5} {'attn':>6} {'step ms':>9} {'tokens/s':>10} {'MFU':>6} "
          f"{'time/dense':>10} {'FLOPs/dense':>11} {'time/FLOPs':>10} {'(min..max)':>12} {'temp MiB':>9}")
    for row in r["rows"]:
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        temp = "n/a" if row["temp_bytes"] is None else f"{row['temp_bytes'] / 2 ** 20:.1f}"
        print(f"  {row['shape']:<5} {row['variant']:<10} {row['grad_accum']:>5} {row['attention']:>6} "
              f"{1e3 * row['median_step_s']:>9.1f} {row['tokens_per_s']:>10,.0f} {mfu:>6} "
              f"{row['time_ratio_vs_dense']:>10.2f} {row['flop_ratio_vs_dense']:>11.2f} "
              f"{row['time_over_flop_ratio']:>10.3f} "
              f"{row['time_over_flop_ratio_min']:>5.2f}..{row['time_over_flop_ratio_max']:<5.2f} {temp:>9}")
    print()
    for shape, ok in r["versatile_meets_target"].items():
        row = next(x for x in r["rows"] if x["shape"] == shape and x["variant"] == "versatile")
        print(f"  {shape}: versatile time/FLOPs {row['time_over_flop_ratio']:.3f} (median of {row['rounds']} rounds), "
              f"{'meets' if ok else 'MISSES'} the target <= {r['target']}")
    if r["memory"]:
        print()
        measure = next((m["measure"] for m in r["memory"] if "measure" in m), "")
        print(f"peak memory per step by remat policy ({measure}; compilation and warm-up excluded; one process each)")
        print(f"  {'shape':<5} {'variant':<10} {'remat':<5} {'peak MiB':>9} {'over start':>10} {'state MiB':>9} "
              f"{'XLA temp MiB':>12}")
        mib = lambda v: "n/a" if v is None else f"{v / 2 ** 20:.1f}"  # noqa: E731
        for m in r["memory"]:
            if "error" in m:
                print(f"  {m['shape']:<5} {m['variant']:<10} {m['remat']:<5} failed: {m['error']}")
                continue
            print(f"  {m['shape']:<5} {m['variant']:<10} {m['remat']:<5} {mib(m['peak_bytes']):>9} "
                  f"{mib(m['peak_over_start_bytes']):>10} {mib(m['state_bytes']):>9} {mib(m['temp_bytes']):>12}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.no_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        print("error: --steps and --rounds must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
