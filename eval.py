#!/usr/bin/env python
"""`python eval.py ...` runs the `vffn-eval` command (vffn_jax/cli/eval.py): held-out metrics, downstream tasks,
learning curves of a run. `python eval.py --help` explains every flag."""
from vffn_jax.cli.eval import build_parser, format_report, main  # noqa: F401  (tools import them here)

if __name__ == "__main__":
    from vffn_jax.cli.eval import console

    console()
