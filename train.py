#!/usr/bin/env python
"""`python train.py ...` runs the `vffn-train` command (vffn_jax/cli/train.py): train, resume, dry-run, TPU pre-flight.
`python train.py --help` explains every flag."""
from vffn_jax.cli.train import build_parser, main, print_dry_run, resolve_config  # noqa: F401  (tools import them here)

if __name__ == "__main__":
    from vffn_jax.cli.train import console

    console()
