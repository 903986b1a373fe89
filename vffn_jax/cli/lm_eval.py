"""`vffn-lm-eval` (also `python -m vffn_jax.cli.lm_eval`): lm-evaluation-harness on a vffn_jax run with the
JAX model backend of vffn_jax/evals/lm_harness.py (no torch; how requests are scored and generated: that module).

    vffn-lm-eval --workdir runs/tiny --tasks vffn_downstream [--limit 100] [--output r.json]
    vffn-lm-eval --workdir runs/tiny --tasks hellaswag,lambada_openai --batch-size 16

Needs lm-evaluation-harness (pip install -r requirements-hf.txt). Exit status: 0 done, 2 bad input (missing run
or step, unknown task, bad flag, lm-eval not installed).
"""
from __future__ import annotations

import argparse
import json
import logging

from vffn_jax.cli import runner


def build_parser() -> argparse.ArgumentParser:
    p = runner.parser("vffn-lm-eval", __doc__)
    p.add_argument("--workdir", required=True, metavar="RUN", help="training run or params-only export (local or gs://)")
    p.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step (default: the latest)")
    p.add_argument("--tasks", required=True, metavar="T[,T]",
                   help="lm-eval task or group names: vffn_downstream (the eight of eval.py --tasks), vffn_piqa, ..., "
                        "or lm-eval's own")
    p.add_argument("--include-path", "--include_path", dest="include_path", action="append", default=[], metavar="DIR",
                   help="a local folder of more lm-eval task YAMLs (repeatable; a missing folder is an error); the "
                        "vffn_* tasks are always included")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N documents of each task")
    p.add_argument("--batch-size", default=None, metavar="ROWS",
                   help="rows per scoring batch (default: as many as eval.py --tasks puts in one batch)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples (default: the task's)")
    p.add_argument("--max-gen-toks", type=int, default=None, metavar="N",
                   help="generation budget when a task does not set one (default 256)")
    p.add_argument("--seed", type=int, default=0, help="few-shot sampling and generation seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="how the restored run executes: model.depth_exec, model.depth_block, model.attention, model.dtype")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in --output")
    p.add_argument("--output", default=None, metavar="FILE|gs://...", help="also write lm-eval's results as JSON")
    return p


def check_include_paths(paths: list[str]) -> None:
    """FileNotFoundError / ConfigError naming --include-path when a folder is missing (lm-eval would skip it)."""
    import os

    from vffn_jax import storage
    from vffn_jax.errors import ConfigError

    for path in paths:
        if storage.is_gcs(path):
            raise ConfigError(f"--include-path={path}: lm-eval reads task YAMLs from a local folder; copy them here "
                              "(e.g. `gcloud storage cp -r`) and pass that folder")
        if not os.path.isdir(os.path.expanduser(path)):
            what = "is a file" if os.path.exists(os.path.expanduser(path)) else "does not exist"
            raise FileNotFoundError(f"--include-path={path} {what}: give a folder of lm-eval task YAML files")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner.quiet_startup()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task notices about custom datasets, chat templates
    from vffn_jax import errors, storage
    from vffn_jax.config import parse_set_args

    try:
        check_include_paths(args.include_path)  # before lm-eval is imported (or found missing)
        from vffn_jax.evals import lm_harness  # imports lm-eval: after the flags, so --help works without it

        budget = {} if args.max_gen_toks is None else {"max_gen_toks": args.max_gen_toks}
        result = lm_harness.evaluate(args.workdir, args.tasks, step=args.step, include_paths=args.include_path,
                                     limit=args.limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                                     seed=args.seed, overrides=parse_set_args(args.overrides),
                                     log_samples=args.log_samples, **budget)
        import jax

        if args.output and jax.process_index() == 0:
            from lm_eval.utils import handle_non_serializable

            out = storage.as_path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            storage.write_text_atomic(out, json.dumps(result, indent=2, default=handle_non_serializable) + "\n")
    except Exception as e:  # bad input: `error: ...` and exit 2 (vffn_jax.errors); anything else is a bug
        return errors.report(e)
    from lm_eval.utils import make_table

    info = result["vffn_jax"]
    print(f"lm-eval on {info['workdir']} step {info['step']} (tokenizer {info['tokenizer']}, context {info['seq_len']}, "
          f"{info['devices']})")
    for note in info["notes"]:
        print(f"note: {note}")
    print(make_table(result))
    if result.get("groups"):
        print(make_table(result, "groups"))
    return 0


def console() -> None:
    """The `vffn-lm-eval` console script."""
    runner.console(main)


if __name__ == "__main__":
    console()
