"""Jitted programs memoised on what determines them, so a second run, evaluation or sweep row with the same model,
section and mesh in one process re-uses the traced and compiled program instead of building a new closure."""
from __future__ import annotations

import collections
from typing import Any, Callable

import jax

_PROGRAMS: collections.OrderedDict = collections.OrderedDict()  # key -> jitted program, least recently used first
_KEPT = 8  # a process rarely alternates between more programs (eval.py --all-steps, a sweep, the tests)


def memoised(key: Any, build: Callable[[], Any]) -> Any:
    """One jitted program per (builder, model, train, mesh, shardings): a second `train()` or `evaluate_run()`
    with the same model and training sections in one process re-uses the traced and compiled step."""
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    step = _PROGRAMS[key] = build()
    while len(_PROGRAMS) > _KEPT:
        _PROGRAMS.popitem(last=False)
    return step


def tree_key(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)
