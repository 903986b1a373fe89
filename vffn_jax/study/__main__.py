"""`python -m vffn_jax.study ...`: see `vffn_jax.study.runner`."""
from vffn_jax.study.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
