"""`python -m vffn_jax.study ...` = `vffn-study ...` (vffn_jax/cli/study.py)."""
from vffn_jax.cli import runner, study

if __name__ == "__main__":
    runner.console(study.main)
