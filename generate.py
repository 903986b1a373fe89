#!/usr/bin/env python
"""`python generate.py ...` runs the `vffn-generate` command (vffn_jax/cli/generate.py): text from a trained or
exported run with a KV cache, showing how deep each token went. `python generate.py --help` explains every flag."""
from vffn_jax.cli.generate import build_parser, format_text, main, read_prompts, run  # noqa: F401  (tools import them)

if __name__ == "__main__":
    from vffn_jax.cli.generate import console

    console()
