"""`python -m vffn_jax.hf import|export ...` = `vffn-hf ...` (vffn_jax/cli/hf.py)."""
from vffn_jax.cli import hf, runner

if __name__ == "__main__":
    runner.console(hf.main)
