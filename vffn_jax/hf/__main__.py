"""`python -m vffn_jax.hf import|export ...`: Llama-family checkpoints in, every variant out (docs/huggingface.md)."""
from __future__ import annotations

import sys

USAGE = """usage: python -m vffn_jax.hf {import,export} [options]

  import   a local Hugging Face Llama-family directory (config.json + *.safetensors) -> a vffn_jax run directory
           that eval.py, generate.py and train.py --init-from use (--variant adds the VersatileFFN routers)
  export   a vffn_jax run -> a directory AutoModelForCausalLM.from_pretrained loads (dense: LlamaForCausalLM;
           other variants: custom code, trust_remote_code=True)

python -m vffn_jax.hf import --help / export --help explain every flag."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "import":
        from vffn_jax.hf import importer

        return importer.main(rest)
    if command == "export":
        from vffn_jax.hf import export

        return export.main(rest)
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
