"""Matmul FLOPs of a traced program, with every loop counted as many times as it runs.

XLA's cost analysis counts the body of a `while` loop once, and a scanned layer stack is such a
loop, so on the compiled step it reports a fraction of the work. This walks the step's jaxpr
instead: every `dot_general` contributes 2 x (output size) x (contracted size), scans multiply
their body by their length, rematerialised (`checkpoint`) regions count again where the backward
pass recomputes them, `cond` takes its most expensive branch, and shard_map bodies (per-shard shapes)
are multiplied by the number of shards. A `while_loop` with a data-dependent trip count (only the
inference depth loop has one) counts once and is reported in `dynamic_loops`. Pallas kernels count
what their `cost_estimate` declares. Global FLOPs: divide by the device count for per-device work.
"""
from __future__ import annotations

import math
from typing import Any

from jax.extend import core as jex_core


def _dot_flops(eqn) -> float:
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract_lhs)


def _sub_jaxprs(value) -> list:
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _count(jaxpr, stats: dict[str, Any]) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * _count(eqn.params["jaxpr"].jaxpr, stats)
        elif name == "while":
            stats["dynamic_loops"] += 1
            total += _count(eqn.params["body_jaxpr"].jaxpr, stats) + _count(eqn.params["cond_jaxpr"].jaxpr, stats)
        elif name == "cond":
            total += max(_count(b.jaxpr, stats) for b in eqn.params["branches"])
        elif name == "pallas_call":
            estimate = eqn.params.get("cost_estimate")
            total += float(getattr(estimate, "flops", 0) or 0)
            stats["pallas_calls"] += 1
        elif name == "shard_map":
            mesh = eqn.params["mesh"]
            shards = math.prod(mesh.shape[a] for a in eqn.params.get("manual_axes", mesh.axis_names))
            total += shards * sum(_count(j, stats) for j in _sub_jaxprs(eqn.params["jaxpr"]))
        else:  # pjit, checkpoint/remat, custom_jvp/vjp calls, ...: their inner programs run once
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += _count(sub, stats)
    return total


def matmul_flops(closed_jaxpr) -> dict[str, Any]:
    """{"flops": global matmul FLOPs, "dynamic_loops": ..., "pallas_calls": ...} of a ClosedJaxpr."""
    stats = {"dynamic_loops": 0, "pallas_calls": 0}
    flops = _count(closed_jaxpr.jaxpr, stats)
    return {"flops": flops, **stats}


def traced_step_flops(step, *abstract_args) -> dict[str, Any]:
    """`matmul_flops` of a jitted (or `sharding.on_mesh`) function traced at abstract arguments."""
    traced = step.trace(*abstract_args)
    return matmul_flops(traced.jaxpr)

