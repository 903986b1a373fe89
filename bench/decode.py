#!/usr/bin/env python
"""Decode speed of dense, kloop (K=4), depth_only and versatile (masked and compacted depth loops), side by side.

For each variant and batch size (default 1, 8 and 64): random prompts of --prompt-len tokens, then
--new-tokens tokens per row with the KV cache (`vffn_jax.infer.decode.generate`, temperature-1 sampling,
EOS ignored so every row runs the full budget). Times the decode loop only (the prefill and the
compile are excluded: every configuration is compiled and run once first), in interleaved rounds so
machine noise hits all variants alike; the table reports the median over rounds.

Columns:
  tok/s          generated tokens per second (all rows), decode loop only
  own depth      mean loops per layer of each generated token's own forward pass (its argmax depth)
  exec loops     FFN loops per token and layer the decode steps actually executed (model.depth_exec: masked
                 runs every row as deep as the batch's deepest token, compact each loop only on the rows
                 that need it, in blocks of ceil(batch/8) rows)
  time vs k4     time per token / kloop4's at the same batch
  loops vs k4    exec loops / 4

  MFLOPs/token   inference FLOPs per generated token three ways (`flops.inference_flops` at seq_len =
                 prompt + new tokens, from the row's own depth and exec loops): ideal (each token at its
                 own depth), executed (what the steps ran, exec loops) and the
                 paper's Table 2 convention (FFN matmuls only; labelled "paper FFN")

Weights are a fresh initialisation of the tiny scale (random routers give near-uniform depths), unless
--versatile-run names a trained versatile run of the same shape (e.g. runs/tiny), which adds a row
with its learned depths.

Examples:
  python bench/decode.py
  python bench/decode.py --versatile-run runs/tiny --batch 1,8,64 --new-tokens 64 --rounds 3
  python bench/decode.py --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = (("dense", "dense", {}), ("kloop4", "kloop", {"model.n_loops": 4}), ("depth_only", "depth_only", {}),
            ("versatile masked", "versatile", {"model.depth_exec": "masked"}),
            ("versatile compact", "versatile", {"model.depth_exec": "compact"}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="scale preset (default tiny)")
    p.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--versatile-run", default=None, metavar="DIR", help="also time a trained versatile run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from vffn_jax import config as config_lib
    from vffn_jax.infer import decode
    from vffn_jax.model import kv_cache
    from vffn_jax.perf import flops
    from vffn_jax.infer import sampling
    from vffn_jax.model import placement
    from vffn_jax.parallel import sharding as shd

    overrides = config_lib.parse_set_args(args.overrides) if args.overrides else {}
    batches = [int(b) for b in args.batch.split(",")]
    device = jax.devices()[:1]
    mesh = shd.make_mesh(config_lib.MeshConfig(data=1), device)
    models = []
    for name, variant, extra in VARIANTS:
        cfg = config_lib.load_config(args.config, variant, {**overrides, **extra})
        _, params, _ = placement.init_params(cfg.model, mesh, cfg.train.seed)
        models.append((name, cfg, kv_cache.pure_params(params)))
    if args.versatile_run:
        from vffn_jax.checkpoint import restore

        import dataclasses

        run = restore.restore_params(args.versatile_run, devices=device)
        for mode in ("masked", "compact"):
            cfg = dataclasses.replace(run.cfg, model=dataclasses.replace(run.cfg.model, depth_exec=mode))
            models.append((f"versatile {mode} ({args.versatile_run}, step {run.step})", cfg,
                           kv_cache.pure_params(run.params)))
    rng = np.random.default_rng(0)
    s_cfg = sampling.SamplingConfig(temperature=1.0)

    def once(cfg, params, b):
        m = cfg.model
        prompts = rng.integers(0, 256, (b, args.prompt_len)).tolist()
        gens, st = decode.generate(m, params, prompts, max_new_tokens=args.new_tokens + 1, context=cfg.train.seq_len,
                                   sampling_cfg=s_cfg, seed=int(rng.integers(1 << 30)), eos_id=None, valid_vocab=257)
        own = np.concatenate([g.depth[1:] for g in gens]).mean()
        return st.decode_s, st.decode_tokens, float(st.step_loops.mean()), float(own)

    for name, cfg, params in models:  # compile and warm up every configuration
        for b in batches:
            once(cfg, params, b)
    times = {(n, b): [] for n, _, _ in models for b in batches}
    stats = {}
    for _ in range(args.rounds):
        for name, cfg, params in models:
            for b in batches:
                dt, n_tok, loops, own = once(cfg, params, b)
                times[(name, b)].append(dt / n_tok)
                stats.setdefault((name, b), []).append((loops, own))
    rows = []
    for b in batches:
        k4 = statistics.median(times[("kloop4", b)])
        for name, cfg, _ in models:
            t = statistics.median(times[(name, b)])
            loops = float(np.mean([s[0] for s in stats[(name, b)]]))
            own = float(np.mean([s[1] for s in stats[(name, b)]]))
            fl = flops.inference_flops(cfg.model, args.prompt_len + args.new_tokens, mean_depth=own,
                                       executed_depth=loops)
            rows.append({"variant": name, "batch": b, "tokens_per_s": 1.0 / t, "ms_per_step": 1e3 * t * b,
                         "own_depth": own, "exec_loops": loops, "time_vs_kloop4": t / k4, "loops_vs_kloop4": loops / 4,
                         **flops.inference_flops_fields(fl)})
    m = models[0][1].model
    info = {"device": f"{device[0].device_kind} ({jax.default_backend()})", "config": args.config,
            "shape": f"d_model={m.d_model} layers={m.n_layers} heads={m.n_heads} d_ff={m.d_ff} vocab={m.vocab_size}",
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds}
    if args.json:
        print(json.dumps({**info, "rows": rows}, indent=1))
        return 0
    print(f"decode on {info['device']}, {args.config}: {info['shape']}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens/row, median of {args.rounds} rounds")
    print()
    print("| variant | batch | tok/s | ms/step | own depth | exec loops | time vs kloop4 | loops vs kloop4 "
          "| MFLOPs/token ideal | executed | paper FFN |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
              f"{r['own_depth']:.2f} | {r['exec_loops']:.2f} | {r['time_vs_kloop4']:.2f} | {r['loops_vs_kloop4']:.2f} "
              f"| {r['flops_per_token_inference'] / 1e6:.3f} | {r['flops_per_token_inference_executed'] / 1e6:.3f} "
              f"| {r['flops_per_token_inference_paper'] / 1e6:.3f} |")
    print()
    print(flops.INFERENCE_FLOPS_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
