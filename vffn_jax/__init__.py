"""VersatileFFN language-model pretraining in JAX/Flax NNX.

`platform` runs first, before anything imports JAX's backends: with the optional TPU extra installed on
a host without TPUs it keeps ordinary CPU commands free of libtpu's start-up warnings (see its docstring).
"""
from vffn_jax import platform as _platform

_platform.apply()
