"""The command lines: one module per verb over one runner (`runner.py`). Console scripts (`vffn-train`,
`vffn-eval`, ...; pyproject.toml) point here, and the root scripts `train.py`, `eval.py`, `generate.py` are
shims over the same `main` functions. No library module below this package builds an argument parser."""
