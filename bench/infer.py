#!/usr/bin/env python
"""Inference (eval-step) time of versatile with depth-compacted vs masked depth loops, beside dense and kloop-4.

One jitted inference forward (held-out loss and statistics, `evals.step.make_eval_step`) per configuration,
on the same random batch, timed in interleaved rounds (median) after a warm-up, so machine noise hits all
alike. The depth distribution decides what compaction can save, so the versatile rows use the learned
routers of a trained run when --run names one (default runs/tiny if it exists; its own shape), else a fresh
initialisation at the shape of --config/--set (random routers: depths near-uniform over 1..L).

Columns:
  ms/batch        median time of one eval step
  own depth       mean over layers and tokens of each token's argmax depth (what the outputs depend on)
  exec loops      FFN loops per token the step ran (compact: rows of the blocks run; masked: the batch's max)
  time vs dense   step time / dense's
  ideal vs dense  ideal inference FLOPs per token (each token at its own depth) / dense's
  time / ideal    (time vs dense) / (ideal vs dense): 1.0 means the time follows the ideal FLOPs exactly

Examples:
  python bench/infer.py                         # runs/tiny's routers if present
  python bench/infer.py --run runs/tiny --batch 16 --rounds 7
  python bench/infer.py --run none --set model.d_ff=2048   # fresh weights, an FFN-heavy shape
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="scale preset for the fresh-weight models (default tiny)")
    p.add_argument("--run", default="runs/tiny", help="a trained versatile run whose routers (and shape) to use, "
                   "or 'none' (default runs/tiny when it exists)")
    p.add_argument("--batch", type=int, default=None, help="rows per eval batch (default: the config's batch_size)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="overrides for the fresh-weight configs (ignored for the shape when --run is used)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from vffn_jax import config as config_lib
    from vffn_jax.model import placement
    from vffn_jax.perf import flops
    from vffn_jax.evals import step as step_lib
    from vffn_jax.parallel.sharding import global_batch

    device = jax.devices()[:1]
    overrides = {**config_lib.parse_set_args(args.overrides), "mesh.data": 1}
    trained = None
    if args.run != "none" and Path(args.run).joinpath("config.json").exists():
        from vffn_jax.checkpoint import restore

        trained = restore.restore_params(args.run, devices=device)
        base = trained.cfg
        shape = {f"model.{k}": getattr(base.model, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff")}
        shape.update({"train.seq_len": base.train.seq_len, "train.batch_size": base.train.batch_size})
        overrides = {**overrides, **shape}
    if args.batch:
        overrides["train.batch_size"] = args.batch

    def model(variant, extra, params=None):
        cfg = config_lib.load_config(args.config, variant, {**overrides, **extra})
        s = placement.setup(cfg, device)
        if params is None:
            _, params, _ = placement.init_params(cfg.model, s.mesh, cfg.train.seed)
        return cfg, step_lib.make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings), params

    rows = [("dense", *model("dense", {})), ("kloop4", *model("kloop", {"model.n_loops": 4}))]
    vparams = trained.params if trained is not None else None
    for mode in ("masked", "compact"):
        rows.append((f"versatile {mode}", *model("versatile", {"model.depth_exec": mode}, vparams)))
    cfg0 = rows[0][1]
    batch = np.random.default_rng(0).integers(0, 256, (cfg0.train.batch_size, cfg0.train.seq_len + 1)).astype(np.int32)
    batch = global_batch(batch, placement.setup(cfg0, device).mesh)
    out = {name: jax.device_get(step(params, batch)) for name, _, step, params in rows}  # compile + warm up
    times = {name: [] for name, *_ in rows}
    for _ in range(args.rounds):
        for name, _, step, params in rows:
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, batch))
            times[name].append(time.perf_counter() - t0)
    seq = cfg0.train.seq_len
    dense_t = statistics.median(times["dense"])
    dense_f = flops.flops_per_token(rows[0][1].model, seq, train=False)
    table = []
    for name, cfg, _, _ in rows:
        o = out[name]
        own = float(np.mean(np.asarray(o["depth_hist"]) @ np.arange(1, cfg.model.max_depth + 1))) \
            if "depth_hist" in o else None
        executed = float(np.mean(o["executed_depth"])) if "executed_depth" in o else None
        fl = flops.inference_flops(cfg.model, seq, mean_depth=own, executed_depth=executed)
        t = statistics.median(times[name])
        table.append({"variant": name, "ms_per_batch": 1e3 * t, "own_depth": own, "exec_loops": executed,
                      "time_vs_dense": t / dense_t, "ideal_vs_dense": fl["ideal"] / dense_f,
                      "executed_vs_ideal": fl["executed"] / fl["ideal"],
                      "time_over_ideal": (t / dense_t) / (fl["ideal"] / dense_f),
                      "loss": float(o["ce_sum"] / o["tokens"])})
    m = cfg0.model
    info = {"device": f"{device[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}",
            "weights": f"trained run {args.run} (step {trained.step})" if trained else "fresh initialisation",
            "shape": f"d_model={m.d_model} layers={m.n_layers} heads={m.n_heads} d_ff={m.d_ff} vocab={m.vocab_size}",
            "batch": f"{cfg0.train.batch_size} x {seq}", "rounds": args.rounds}
    if args.json:
        print(json.dumps({**info, "rows": table}, indent=1))
        return 0
    print(f"eval step on {info['device']}; {info['shape']}; batch {info['batch']}; versatile weights: "
          f"{info['weights']}; median of {args.rounds} rounds")
    print()
    print("| variant | ms/batch | own depth | exec loops | executed / ideal FLOPs | time vs dense | ideal vs dense "
          "| time / ideal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for r in table:
        print(f"| {r['variant']} | {r['ms_per_batch']:.1f} | {fmt(r['own_depth'])} | {fmt(r['exec_loops'])} | "
              f"{r['executed_vs_ideal']:.2f} | {r['time_vs_dense']:.2f} | {r['ideal_vs_dense']:.2f} | "
              f"{r['time_over_ideal']:.2f} |")
    masked, compact = table[-2], table[-1]
    print()
    print(f"versatile compact vs masked: time {compact['ms_per_batch'] / masked['ms_per_batch']:.2f}x, "
          f"same loss to {abs(compact['loss'] - masked['loss']):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
