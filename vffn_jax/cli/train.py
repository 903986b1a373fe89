"""Train a VersatileFFN (or baseline) language model. Re-running the same command resumes.

Examples:
  python train.py --config tiny --workdir runs/tiny
  python train.py --config 354m --variant dense --dry-run --json
  python train.py --config tiny --variant kloop --set model.n_loops=2 --set train.steps=50 --workdir runs/k2
  python train.py --config tiny --variant versatile --init-from runs/dense --workdir runs/vffn_cont
  python train.py --config 354m --workdir gs://my-bucket/runs/354m-versatile   # on every host of a pod

Preemption: on SIGTERM (TPU VMs, SLURM, Kubernetes; on several hosts, at JAX's preemption sync point)
every process saves the same step, waits for it to commit and exits with status 75; re-run the same
command to resume. run.ckpt_minutes adds a time-based save as a backstop to run.ckpt_every.
Ctrl-C does the same and exits 130 (Ctrl-C again: stop at once, no save). run.hang_minutes=M: when no
step finishes for M minutes, every process writes its thread stacks to WORKDIR/hang-<process>.txt and
exits 86, for a supervisor to restart it.

Exit status: 0 done (or --stop-at reached), 2 invalid config/path/bucket or every checkpoint damaged,
3 diverged (NaN) or checkpoint does not match the config, 4 peers missing at start-up, 75 preempted
(checkpoint saved; re-run to resume), 86 hung (run.hang_minutes), 130 Ctrl-C (the step reached was saved
once training had started).
"""
from __future__ import annotations

import argparse
import json
import sys

from vffn_jax import config as config_lib
from vffn_jax.cli import runner
from vffn_jax.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED


def build_parser() -> argparse.ArgumentParser:
    p = runner.parser("vffn-train", __doc__)
    p.add_argument("--config", default="tiny",
                   help=f"scale preset {config_lib.available('scales')} or a path to a JSON config "
                        "(e.g. a run's saved config.json). Default: tiny")
    p.add_argument("--variant", default=None,
                   help=f"FFN variant preset {config_lib.available('variants')}. Default: versatile "
                        "(for a JSON --config: the file's own model.ffn)")
    p.add_argument("--workdir", help="run directory, a local path or gs://BUCKET/PATH: checkpoints/, metrics.jsonl, "
                                     "tb/ (TensorBoard), config.json, compile_cache/. Required unless --dry-run")
    p.add_argument("--steps", type=int, help="total training steps (shorthand for --set train.steps=N)")
    p.add_argument("--init-from", metavar="DIR|gs://...",
                   help="continued pretraining: start from the params of another run of the same shape (its workdir, "
                        "checkpoints/ or checkpoints/STEP; any variant, e.g. dense). Shared weights are copied, new "
                        "routers/experts initialised fresh, optimizer and step reset. Ignored when --workdir already "
                        "has checkpoints (it resumes). Shorthand for --set train.init_from=DIR")
    p.add_argument("--init-step", type=int, metavar="N",
                   help="with --init-from: the source checkpoint step (default: its latest; --set train.init_step=N)")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="end this invocation after STEP (checkpointed), keeping the schedule of train.steps; "
                        "re-running the command continues. For time-boxed jobs")
    p.add_argument("--profile-steps", metavar="A:B",
                   help="write a jax.profiler trace of training steps A..B into WORKDIR/tb (TensorBoard's profile "
                        "tab; the .trace.json.gz opens in Perfetto). Shorthand for --set run.profile_steps=A:B")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.d_model=256 --set train.lr=1e-3 "
                        "(repeatable; unknown keys are an error)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model abstractly (no weights), print parameter counts, FLOPs per token, "
                        "the mesh and every parameter's sharding, then exit")
    p.add_argument("--topology", metavar="NAME",
                   help="with --dry-run: TPU pre-flight. Ahead-of-time compile the real train step for a TPU "
                        "topology (e.g. v5p:4x4x4, v5e:16x16, v4:2x2x2) on this host and report per-device memory "
                        "against the chip's HBM; for depth-routed variants also the inference eval step (its "
                        "depth loops as model.depth_exec runs them). Needs libtpu: pip install -r requirements-tpu.txt")
    p.add_argument("--sweep", nargs="?", const="default", metavar="SPEC",
                   help="with --dry-run --topology: also compile every combination of SPEC (KEY=V1,V2;KEY=...; default "
                        "model.remat=none,dots,full;train.grad_accum=1,2,4;model.attention=xla,splash: per-chip "
                        "microbatch, remat and attention kernel at the run's global batch) and print the fastest by the "
                        "roofline that fits")
    p.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to the workdir)")
    runner.add_distributed_arguments(p)
    return p


def resolve_config(args) -> config_lib.Config:
    overrides = config_lib.parse_set_args(args.overrides)
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.init_from is not None:
        overrides["train.init_from"] = args.init_from
    if args.init_step is not None:
        overrides["train.init_step"] = args.init_step
    if args.profile_steps is not None:
        overrides["run.profile_steps"] = args.profile_steps
    is_file = args.config.endswith(".json")
    variant = args.variant if args.variant or is_file else "versatile"
    return config_lib.load_config(args.config, variant, overrides)


def print_dry_run(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['scale']} / {info['variant']} (ffn={info['ffn']})")
    print(f"  params total          {info['params_total']:>16,}")
    print(f"  params non-embedding  {info['params_non_embedding']:>16,}")
    print(f"  FLOPs/token train     {info['flops_per_token_train']:>16,.0f}")
    depth, run = info["inference_depth_assumed"], info["inference_executed_depth_assumed"]
    print(f"  FLOPs/token inference {info['flops_per_token_inference']:>16,.0f}  ideal: each token at its own depth"
          + (f" (assumed mean {depth} loops, depth uniform over 1..L)" if depth else ""))
    print(f"                        {info['flops_per_token_inference_executed']:>16,.0f}  executed: what the batch runs"
          + (f" (the depth loop to the batch's deepest token: assumed {run} loops)" if run else "")
          + (" (the dense dispatch runs all E experts)" if info["ffn"] == "moe" else ""))
    print(f"                        {info['flops_per_token_inference_paper']:>16,.0f}  paper: FFN only, sparse experts "
          f"(Table 2's convention) = {info['paper_ffn_vs_dense']:.3f} x dense FFN per layer")
    print(f"  tokens per step       {info['tokens_per_batch']:>16,}")
    print(f"  mesh                  {info['mesh']} on {info['devices']}")
    print(f"  param bytes/device    {info['param_bytes_per_device']:>16,}  (replicated "
          f"{info['replicated_param_fraction']:.3%}, redundant {info['redundant_param_fraction']:.3%} of all)")
    print("  parameter shardings:")
    for name, entry in info["shardings"].items():
        print(f"    {name:<32} {str(tuple(entry['shape'])):<24} {entry['spec']:<36} {entry['shards']:>4} shards")
    if "preflight" in info:
        from vffn_jax.train.preflight import format_report, format_sweep

        print(format_report(info["preflight"]))
        if "sweep" in info:
            print(format_sweep(info["sweep"]))


def main(argv=None) -> int:
    from vffn_jax.train import watchdog

    # Ctrl-C outside the training loop (start-up, dry runs) exits 130 at once; the loop installs its own (save first)
    ctrl_c = watchdog.CtrlC(on_first=lambda: watchdog.exit_now("(Ctrl-C) before training started: nothing saved"))
    try:
        return _main(argv)
    finally:
        ctrl_c.close()


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dist = runner.distributed_args(args)
        cfg = resolve_config(args)
        from vffn_jax.model import placement  # imports jax: after argument errors are reported

        if args.topology and not args.dry_run:
            raise config_lib.ConfigError("--topology is a pre-flight check: use it with --dry-run")
        if args.sweep and not args.topology:
            raise config_lib.ConfigError("--sweep compiles for a TPU topology: use it with --dry-run --topology NAME")
        if args.dry_run:
            devices = None
            if args.topology:
                from vffn_jax.train import preflight

                devices = preflight.topology_devices(args.topology)
            import jax

            # what training would refuse on these devices (e.g. model.attention=cudnn without a GPU), refused here too
            config_lib.validate(cfg, platform=(devices if devices is not None else jax.devices())[0].platform)
            info = placement.describe(placement.setup(cfg, devices))
            if args.topology:
                info["preflight"] = preflight.compile_train_step(cfg, devices)
                if cfg.model.ffn in config_lib.DEPTH_KINDS:  # the inference step's data-dependent depth loops too
                    info["preflight"]["eval"] = preflight.compile_eval_step(cfg, devices)
            if args.sweep:
                spec = preflight.DEFAULT_SWEEP if args.sweep == "default" else args.sweep
                info["sweep"] = preflight.sweep(cfg, devices, spec,
                                                log=lambda text: None if args.json else print(text, flush=True))
            print_dry_run(info, args.json)
            return 0
        from vffn_jax.parallel import distributed

        distributed.initialize(dist, args.workdir)
        if not args.workdir:
            raise config_lib.ConfigError("--workdir is required to train (where checkpoints and metrics go)")
        from vffn_jax.train import loop as trainer

        summary = trainer.train(cfg, args.workdir, progress=not args.no_progress, stop_at=args.stop_at)
    except Exception as e:  # bad input, damage, divergence, a lost peer: say what and where, no traceback wall
        return runner.report(e)
    if summary["interrupted"]:
        if summary["is_main"]:
            print(f"vffn_jax: interrupted (Ctrl-C) at step {summary['step']}: saved checkpoint {summary['step']} in "
                  f"{summary['checkpoint_dir']}; re-run the same command to resume", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if summary["preempted"]:
        if summary["is_main"]:
            print(f"preempted: stopped at step {summary['step']} after saving it to {summary['checkpoint_dir']}; "
                  f"re-run the same command to resume (exit status {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    ev = summary["eval"] or {}
    if not ev or not summary["is_main"]:
        return 0
    print(f"done: step {summary['step']}  held-out loss {ev['loss']:.4f}  ppl {ev['perplexity']:.2f}"
          + (f"  mean depth {ev['mean_depth']:.2f}" if "mean_depth" in ev else ""))
    return 0


def console() -> None:
    """The `vffn-train` console script (and `python train.py`)."""
    runner.console(main, interrupted="interrupted (Ctrl-C) before training started: nothing saved")


if __name__ == "__main__":
    console()
