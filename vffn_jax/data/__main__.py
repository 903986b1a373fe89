"""`python -m vffn_jax.data tokenize ...` = `vffn-tokenize ...` (vffn_jax/cli/tokenize.py); `python -m vffn_jax.data
--prepare` = `vffn-tokenize --prepare-default`."""
import sys

from vffn_jax.cli import runner, tokenize

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["tokenize"]:
        argv = argv[1:]
    elif argv[:1] == ["--prepare"]:
        argv = ["--prepare-default", *argv[1:]]
    runner.console(lambda: tokenize.main(argv))
