#!/usr/bin/env python
"""Evaluate a training run's checkpoint on held-out data (parameters only; the run is not modified
apart from writing depth_per_layer.png into it).

Reports the held-out loss and perplexity, the per-layer depth histogram (loops per token at
inference, i.e. argmax of the depth router), mean alpha, virtual-expert load and router entropy,
parameter counts and FLOPs per token (inference counted at the measured mean depth). Uses whatever
devices exist: the saved mesh is kept if it fits, else the run is evaluated data-parallel.

Examples:
  python eval.py --workdir runs/tiny
  python eval.py --workdir runs/tiny --step 200 --batches 16
  python eval.py --workdir runs/tiny --json > eval.json

Exit status: 0 ok, 2 missing run/config/checkpoint step or invalid config, 3 checkpoint does not
match the config.
"""
from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True,
                   help="a training run directory (holds config.json and checkpoints/, as written by train.py)")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step to evaluate (default: the latest; an unknown step lists the available ones)")
    p.add_argument("--batches", type=int, default=None, metavar="N",
                   help="number of held-out batches of train.batch_size x train.seq_len tokens "
                        "(default: the run's run.eval_batches, the same data training's eval/ metrics used)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (every number, per-layer lists included) instead of the text report")
    p.add_argument("--no-plot", action="store_true",
                   help="do not write depth_per_layer.png into the workdir")
    return p


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def format_report(r: dict) -> str:
    lines = [f"{r['scale']}/{r['variant']} (ffn={r['ffn']}) step {r['step']}   {r['workdir']}",
             f"  held-out loss         {r['loss']:.4f}    perplexity {r['perplexity']:.2f}",
             f"  evaluated             {r['eval_batches']} batches x {r['eval_batch_size']} x {r['seq_len']} = "
             f"{r['eval_tokens']:,} tokens   mesh {r['mesh']} on {r['devices']}",
             f"  params total          {r['params_total']:,}   non-embedding {r['params_non_embedding']:,}",
             f"  FLOPs/token train     {r['flops_per_token_train']:,.0f}"]
    inf = f"  FLOPs/token inference {r['flops_per_token_inference']:,.0f}"
    if "inference_flops_depth" in r:
        inf += f"   (at the measured mean depth {r['inference_flops_depth']:.2f})"
    inf += f"   dense FFN: {r['flops_per_token_inference_dense']:,.0f}"
    lines.append(inf)

    if "depth_hist" in r:
        L = r["max_depth"]
        lines.append("")
        lines.append(f"depth: loops per token at inference (argmax of the depth router), L={L}")
        lines.append(f"  mean depth {r['mean_depth']:.3f}   mean alpha {r['mean_alpha']:.3f}   "
                     f"depth-router entropy {r['depth_router_entropy']:.3f} nats   "
                     f"Gumbel tau at step {r['step']}: {r['tau']:.3f}")
        head = "  layer " + "".join(f"{f'{d} loop' + ('s' if d > 1 else ''):>9}" for d in range(1, L + 1)) + "     mean"
        lines.append(head)
        for i, (row, mean) in enumerate(zip(r["depth_hist"], r["mean_depth_per_layer"]), start=1):
            lines.append(f"  {i:>5} " + "".join(f"{_pct(x):>9}" for x in row) + f"   {mean:6.2f}")
        n = len(r["depth_hist"])
        avg = [sum(row[d] for row in r["depth_hist"]) / n for d in range(L)]
        lines.append("    all " + "".join(f"{_pct(x):>9}" for x in avg) + f"   {r['mean_depth']:6.2f}")

    if "expert_load" in r:
        E = r["n_experts"]
        lines.append("")
        lines.append(f"expert load: fraction of token-slots per virtual expert (top-{r['top_k']} of {E}; "
                     f"uniform = {100 / E:.1f}%)")
        lines.append("  layer " + "".join(f"{f'e{e}':>7}" for e in range(E)) + "  max/mean      CV")
        rows = zip(r["expert_load_per_layer"], r["expert_load_max_over_mean_per_layer"], r["expert_load_cv_per_layer"])
        for i, (load, mm, cv) in enumerate(rows, start=1):
            lines.append(f"  {i:>5} " + "".join(f"{_pct(x):>7}" for x in load) + f"  {mm:8.2f}  {cv:6.2f}")
        lines.append("   mean " + "".join(f"{_pct(x):>7}" for x in r["expert_load"])
                     + f"  {r['expert_load_max_over_mean']:8.2f}  {r['expert_load_cv']:6.2f}")
        lines.append(f"  router entropy {r['router_entropy']:.3f} nats (max ln {E} = {r['router_entropy_max']:.3f})   "
                     f"balance loss {r['balance_loss']:.4f}   z-loss {r['z_loss']:.4f}")

    lines.append("")
    if r.get("depth_plot"):
        lines.append(f"plot: {r['depth_plot']}")
    elif r.get("depth_plot_note"):
        lines.append(f"plot: {r['depth_plot_note']}")
    for note in r.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from absl import logging as absl_logging  # orbax logs read-only/handler warnings at WARNING

    absl_logging.set_verbosity(absl_logging.ERROR)
    from vffn_jax.checkpoint import CheckpointMismatchError
    from vffn_jax.config import ConfigError
    from vffn_jax import eval_lib

    try:
        result = eval_lib.evaluate_run(args.workdir, step=args.step, n_batches=args.batches, plot=not args.no_plot)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
