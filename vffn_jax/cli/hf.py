"""`vffn-hf import|export` (also `python -m vffn_jax.hf ...`): Llama-family checkpoints in, every variant out
(vffn_jax/hf/importer.py and vffn_jax/hf/export.py; docs/huggingface.md)."""
from __future__ import annotations

import argparse
import sys

from vffn_jax.cli import runner
from vffn_jax.hf import export as hf_export
from vffn_jax.hf import importer

USAGE = """usage: vffn-hf {import,export} [options]   (also: python -m vffn_jax.hf ...)

  import   a Hugging Face Llama-family directory (config.json + *.safetensors) -> a vffn_jax run directory
           that eval.py, generate.py and train.py --init-from use (--variant adds the VersatileFFN routers)
  export   a vffn_jax run -> a directory AutoModelForCausalLM.from_pretrained loads (dense: LlamaForCausalLM;
           other variants: custom code, trust_remote_code=True)

vffn-hf import --help / export --help explain every flag."""



def _require(command: str, *modules: str) -> None:
    """ConfigError (exit 2) naming the extra to install when the Hugging Face libraries `command` uses are missing."""
    import importlib.util

    from vffn_jax.errors import ConfigError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"vffn-hf {command} needs {', '.join(missing)}: pip install -r requirements-hf.txt "
                          "(or pip install \"vffn_jax[hf]\")")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "import":
        return import_main(rest)
    if command == "export":
        return export_main(rest)
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def import_parser() -> argparse.ArgumentParser:
    p = runner.parser("vffn-hf import", importer.__doc__)
    p.add_argument("--hf", required=True, metavar="DIR",
                   help="Hugging Face model folder, local or gs:// (copied to a local temporary folder first): "
                        "config.json, *.safetensors (+ index when sharded), tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN",
                   help="the vffn_jax run directory to create, local or gs:// (must not exist or be an empty folder)")
    p.add_argument("--variant", default=None, metavar="V",
                   help="FFN variant preset (configs/variants/V.json or a .json path), e.g. versatile: its new "
                        "parameters (routers, moe experts) are freshly initialised with train.seed, every Llama "
                        "weight copied (default: dense, the checkpoint as it is)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied last, e.g. train.seq_len=8192, model.dtype=bfloat16, "
                        "train.seed=1, data.tokenizer=PATH (repeatable)")
    p.add_argument("--dtype", default=None, choices=importer.DTYPES,
                   help="stored parameter dtype, recorded as model.param_dtype (default: the checkpoint's own, "
                        "float32 when its tensors mix dtypes); the compute dtype model.dtype stays float32 "
                        "unless --set model.dtype=...")
    return p


def import_main(argv: list[str] | None = None) -> int:
    args = import_parser().parse_args(argv)
    runner.quiet_startup()
    from vffn_jax import errors
    from vffn_jax.config import parse_set_args

    try:
        _require("import", "safetensors")
        info = importer.import_hf(args.hf, args.out, variant=args.variant, overrides=parse_set_args(args.set), dtype=args.dtype)
    except Exception as e:  # bad input: `error: ...` and exit 2 (vffn_jax.errors); anything else is a bug
        return errors.report(e)
    print(f"imported {info['hf_dir']} ({info['model_type']}, {info['source_dtype']}) -> {info['out']}: "
          f"ffn={info['ffn']}, {info['n_params']:,} parameters ({info['param_dtype']}), {len(info['copied'])} copied, "
          f"fresh: {', '.join(info['fresh']) or 'none'}")
    print(f"tokenizer {info['tokenizer']} (EOS id {info['eos_id']}), train.seq_len={info['seq_len']}")
    for note in info["notes"]:
        print(f"note: {note}")
    return 0


def export_parser() -> argparse.ArgumentParser:
    p = runner.parser("vffn-hf export", hf_export.__doc__)
    p.add_argument("--workdir", required=True, metavar="RUN",
                   help="the training run or params-only export to convert (local or gs://)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the Hugging Face folder to create (local; must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out: its old files are deleted once the new folder is complete "
                        "(without it, a non-empty --out is refused)")
    p.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", default=None, choices=hf_export.DTYPES,
                   help="dtype of the stored weights and of config.json's dtype (default: the run's model.param_dtype)")
    p.add_argument("--max-shard-size", default=hf_export.DEFAULT_SHARD, metavar="SIZE",
                   help=f"largest safetensors file, e.g. 2GB, 500MB, 1GiB (default {hf_export.DEFAULT_SHARD}); above it the "
                        "weights are split into shards with a model.safetensors.index.json")
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    runner.quiet_startup()
    from vffn_jax import errors

    try:
        _require("export", "transformers", "safetensors", "torch")
        info = hf_export.export(args.workdir, args.out, step=args.step, dtype=args.dtype,
                                max_shard_bytes=args.max_shard_size, overwrite=args.overwrite)
    except Exception as e:  # bad input: `error: ...` and exit 2 (vffn_jax.errors); anything else is a bug
        return errors.report(e)
    remote = ", trust_remote_code=True" if info["trust_remote_code"] else ""
    print(f"exported {info['workdir']} step {info['step']} ({info['ffn']}) -> {info['out']}: {info['architecture']}, "
          f"{info['dtype']}, {info['n_params']:,} parameters in {len(info['files'])} file(s)")
    print(f"load with AutoModelForCausalLM.from_pretrained({info['out']!r}{remote})")
    for note in info["notes"]:
        print(f"note: {note}")
    return 0


def console() -> None:
    """The `vffn-hf` console script."""
    runner.console(main)


if __name__ == "__main__":
    console()
