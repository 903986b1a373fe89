#!/usr/bin/env python
"""`python serve.py ...` runs the `vffn-serve` command (vffn_jax/cli/serve.py): an OpenAI-compatible HTTP server
over a trained or exported run, with continuous batching. `python serve.py --help` explains every flag."""
from vffn_jax.cli.serve import build_parser, main  # noqa: F401  (tools import them)

if __name__ == "__main__":
    from vffn_jax.cli.serve import console

    console()
