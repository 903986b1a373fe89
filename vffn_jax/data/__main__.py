"""`python -m vffn_jax.data tokenize ...`: see `vffn_jax.data.tokenize_corpus`."""
from vffn_jax.data.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
