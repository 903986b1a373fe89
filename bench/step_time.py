#!/usr/bin/env python
"""Time the jitted training step of versatile, dense and kloop (K=4) at the same shape, in one run,
optionally at several gradient-accumulation settings (`--grad-accum 1,4`).

Measures `step_lib.make_train_step` only: batches of the synthetic source (`data.path=synthetic`: random
tokens, no files, so no corpus is built or read) already on the devices, no checkpointing, no logging. Every variant is compiled and warmed up first; then the
variants are timed in interleaved rounds (round r runs --steps steps of each variant in turn), so
machine noise (other processes on a shared CPU) hits all of them alike. Each step is timed to
completion (`block_until_ready`); the table reports the median over all rounds.

Columns: median step time, tokens/s, measured time ratio vs dense, analytic training-FLOP ratio vs
dense (`flops.flops_per_token(..., train=True)`: matmuls only), and their quotient (time ratio / FLOP
ratio: 1.0 means the variant's extra FLOPs cost exactly their share of time; the target for
versatile is <= 1.1). On small shapes the non-matmul work (norms, softmax, attention, routing) and
per-op overheads are a large share of a step, so the quotient is only meaningful where matmuls
dominate: use --set to try larger shapes.

With `--grad-accum 1,4` every variant is also compiled with `train.grad_accum=4` (the same global batch
in 4 microbatches): the extra columns give each row's time relative to the same variant at the first
grad_accum value, and the compiled step's temporary memory per device (XLA's `memory_analysis`:
activations, gradients, collectives; the figure accumulation is meant to shrink).

Examples:
  python bench/step_time.py
  python bench/step_time.py --set model.d_model=256 --set model.d_ff=1024 --set train.seq_len=256 --steps 3
  python bench/step_time.py --json
  python bench/step_time.py --grad-accum 1,4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: the repo root holds vffn_jax

from vffn_jax import config as config_lib  # noqa: E402

VARIANTS = (("dense", {}), ("versatile", {}), ("kloop", {"model.n_loops": 4}))
TARGET = 1.1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny",
                   help=f"scale preset {config_lib.available('scales')} or a JSON config path; the same shape is "
                        "used for every variant. Default: tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field for all variants, e.g. --set model.d_model=256 "
                        "--set train.batch_size=8 (repeatable). kloop's K is 4 unless you set model.n_loops")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round. Default: 2")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (dense, versatile, kloop, repeat). "
                                                          "Default: 3")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after compiling. Default: 1")
    p.add_argument("--grad-accum", default="1", metavar="N[,N...]",
                   help="train.grad_accum values to time each variant at (comma-separated, e.g. 1,4); the global "
                        "batch stays train.batch_size. Default: 1")
    p.add_argument("--attention", default="auto", metavar="KIND[,KIND...]",
                   help="model.attention kernels to time each variant with (auto, xla, splash, cudnn; e.g. xla,splash "
                        "on a TPU, xla,cudnn on a GPU). Off TPU splash runs in Pallas interpret mode: correct, not fast")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--moe", action="store_true",
                   help="also time the moe baseline. Its FLOPs count k of E experts (model FLOPs, 1.25x dense FFN for "
                        "8-choose-2) but the dense dispatch runs all E (2x), so expect time/FLOPs well above 1")
    p.add_argument("--no-cache", action="store_true",
                   help="do not use the persistent compilation cache (.jax_cache/ in the repo root, shared with the "
                        "tests); with it, reruns skip most of the compile time (the 'compile s' column then shows "
                        "the time to load the cached executable)")
    return p


def prepare(cfg, n_batches: int = 2):
    """(jitted step, params, opt_state, device batches, setup, compile seconds) for one variant."""
    import dataclasses

    import jax

    from vffn_jax.data import batches as data_lib
    from vffn_jax.parallel import sharding as shd
    from vffn_jax.model import placement
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


def parse_accum(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise config_lib.ConfigError(f"--grad-accum {text!r}: give distinct positive integers, e.g. 1,4")
    return values


def run(args) -> dict:
    import jax
    import jax.numpy as jnp

    from vffn_jax.perf import flops as flops_lib

    base = config_lib.parse_set_args(args.overrides)
    accums = parse_accum(args.grad_accum)
    kernels = [k.strip() for k in args.attention.split(",") if k.strip()]
    states = {}
    for kernel in kernels:
        for accum in accums:
            for name, extra in VARIANTS + ((("moe", {}),) if args.moe else ()):
                cfg = config_lib.load_config(args.config, name, {**extra, **base, "train.grad_accum": accum,
                                                                 "model.attention": kernel})
                compiled, params, opt_state, batches, s, compile_s = prepare(cfg)
                states[(name, accum, kernel)] = {"cfg": cfg, "step": compiled, "params": params, "opt": opt_state,
                                                 "batches": batches, "compile_s": compile_s, "times": [], "n": 0,
                                                 "setup": s, "temp_bytes": temp_bytes(compiled)}

    counters = [jnp.asarray(i, jnp.int32) for i in range(args.warmup + args.rounds * args.steps)]

    def run_steps(st, n: int, record: bool):
        for _ in range(n):
            i = st["n"]
            t0 = time.perf_counter()
            st["params"], st["opt"], metrics = st["step"](st["params"], st["opt"], st["batches"][i % len(st["batches"])],
                                                          counters[i])
            jax.block_until_ready((st["params"], st["opt"], metrics))
            if record:
                st["times"].append(time.perf_counter() - t0)
            st["n"] += 1

    for st in states.values():
        run_steps(st, args.warmup, record=False)
    for _ in range(args.rounds):
        for st in states.values():
            run_steps(st, args.steps, record=True)

    dense = states[("dense", accums[0], kernels[0])]
    d_flops = flops_lib.flops_per_token(dense["cfg"].model, dense["cfg"].train.seq_len, train=True)
    rows = []
    for (name, accum, kernel), st in states.items():
        cfg = st["cfg"]
        med = statistics.median(st["times"])
        d_time = statistics.median(states[("dense", accum, kernel)]["times"])  # dense at the same accum and kernel
        first = states[(name, accums[0], kernel)]
        first_kernel = states[(name, accum, kernels[0])]
        tokens = cfg.train.batch_size * cfg.train.seq_len
        fpt = flops_lib.flops_per_token(cfg.model, cfg.train.seq_len, train=True)
        time_ratio, flop_ratio = med / d_time, fpt / d_flops
        temp, temp_first = st["temp_bytes"], first["temp_bytes"]
        rows.append({
            "variant": name if name != "kloop" else f"kloop-{cfg.model.n_loops}", "ffn": cfg.model.ffn,
            "grad_accum": accum, "attention": kernel,
            "time_ratio_vs_first_attention": med / statistics.median(first_kernel["times"]),
            "median_step_s": med, "min_step_s": min(st["times"]), "tokens_per_s": tokens / med,
            "time_ratio_vs_dense": time_ratio, "flop_ratio_vs_dense": flop_ratio,
            "time_over_flop_ratio": time_ratio / flop_ratio, "flops_per_token_train": fpt,
            "achieved_gflops": fpt * tokens / med / 1e9, "compile_s": st["compile_s"], "samples": len(st["times"]),
            "time_ratio_vs_first_accum": med / statistics.median(first["times"]),
            "temp_bytes": temp,
            "temp_ratio_vs_first_accum": None if temp is None or not temp_first else temp / temp_first,
        })
    m, t = dense["cfg"].model, dense["cfg"].train
    s = dense["setup"]
    versatile = next(r for r in rows if r["ffn"] == "versatile" and r["grad_accum"] == accums[0]
                     and r["attention"] == kernels[0])
    return {
        "config": args.config, "overrides": args.overrides,
        "shape": {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
                  "vocab_size": m.vocab_size, "batch_size": t.batch_size, "seq_len": t.seq_len, "dtype": m.dtype,
                  "n_experts": m.n_experts, "top_k": m.top_k, "max_depth": m.max_depth},
        "devices": f"{len(s.mesh.devices.flat)} x {jax.devices()[0].device_kind}",
        "mesh": dict(zip(s.mesh.axis_names, (int(x) for x in s.mesh.devices.shape))),
        "rounds": args.rounds, "steps_per_round": args.steps, "grad_accum": accums, "attention": kernels,
        "rows": rows,
        "versatile_time_over_flop_ratio": versatile["time_over_flop_ratio"],
        "target": TARGET, "meets_target": versatile["time_over_flop_ratio"] <= TARGET,
    }


def print_table(r: dict) -> None:
    sh = r["shape"]
    print(f"train-step time: {r['config']} {' '.join(r['overrides'])}".rstrip())
    print(f"  shape d_model={sh['d_model']} n_layers={sh['n_layers']} d_ff={sh['d_ff']} vocab={sh['vocab_size']} "
          f"batch {sh['batch_size']} x {sh['seq_len']} tokens, {sh['dtype']}; versatile E={sh['n_experts']} "
          f"k={sh['top_k']} L={sh['max_depth']}")
    print(f"  {r['devices']} mesh {r['mesh']}; {r['rounds']} interleaved rounds x {r['steps_per_round']} steps, "
          "median per variant")
    print()
    accum_cols = len(r["grad_accum"]) > 1
    first = r["grad_accum"][0]
    extra = f" {'time/accum' + str(first):>13} {'temp MiB':>9} {'temp/accum' + str(first):>13}" if accum_cols else ""
    attn_cols = len(r["attention"]) > 1
    extra += f" {'time/' + r['attention'][0]:>12}" if attn_cols else ""
    print(f"  {'variant':<10} {'attn':>6} {'accum':>5} {'step ms':>9} {'min ms':>8} {'tokens/s':>10} {'GFLOP/s':>8} "
          f"{'time/dense':>11} {'FLOPs/dense':>12} {'time/FLOPs':>11} {'compile s':>10}{extra}")
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for row in r["rows"]:
        extra = (f" {row['time_ratio_vs_first_accum']:>13.2f} "
                 f"{fmt(None if row['temp_bytes'] is None else row['temp_bytes'] / 2 ** 20, '.1f'):>9} "
                 f"{fmt(row['temp_ratio_vs_first_accum'], '.2f'):>13}") if accum_cols else ""
        extra += f" {row['time_ratio_vs_first_attention']:>12.2f}" if attn_cols else ""
        print(f"  {row['variant']:<10} {row['attention']:>6} {row['grad_accum']:>5} {1e3 * row['median_step_s']:>9.1f} "
              f"{1e3 * row['min_step_s']:>8.1f} {row['tokens_per_s']:>10,.0f} {row['achieved_gflops']:>8.1f} "
              f"{row['time_ratio_vs_dense']:>11.2f} {row['flop_ratio_vs_dense']:>12.2f} "
              f"{row['time_over_flop_ratio']:>11.2f} {row['compile_s']:>10.1f}{extra}")
    print()
    verdict = "meets" if r["meets_target"] else "MISSES"
    print(f"  versatile: (measured time ratio) / (FLOP ratio) = {r['versatile_time_over_flop_ratio']:.2f}, "
          f"{verdict} the target <= {r['target']}" + (f" (at grad_accum {first})" if accum_cols else ""))
    if accum_cols:
        print("  time/accumN, temp/accumN: the same variant at the first --grad-accum value (temp = the compiled "
              "step's temporary memory per device)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.no_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parent.parent / ".jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
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
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
