"""The per-layer depth / expert / FLOP summary of an evaluation, computed once for eval.py and the study.

`routing_summary` turns the raw held-out metrics of the eval step (`train.step.evaluate`: depth histogram
per layer, mean depth and alpha, the loops per token the inference program executed per layer, expert load, router entropies)
into the figures a report shows: loops per layer, expert balance, and inference FLOPs per token three ways
(ideal at each token's own depth, executed = the loops the inference program ran, the paper's convention).
The same keys arrive as `eval/<key>` rows in metrics.jsonl; `from_metrics_row` strips that prefix.
`plot_depth` (vffn_jax/depth_plot.py) draws the loops-per-layer figure.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from vffn_jax.config import ModelConfig
from vffn_jax.depth_plot import plot_depth  # noqa: F401 - the figure, for eval.py and the study (it lives below train)
from vffn_jax.perf import flops as flops_lib
from vffn_jax.model.stats import load_balance


def from_metrics_row(row: dict[str, Any]) -> dict[str, Any]:
    """The raw eval metrics of a metrics.jsonl `eval/...` row."""
    return {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}


def routing_summary(m: ModelConfig, seq_len: int, raw: dict[str, Any]) -> dict[str, Any]:
    """Depth (depth-routed variants), expert load (routed variants) and FLOP figures of one evaluation."""
    out: dict[str, Any] = {}
    mean_depth = None
    if "depth_hist" in raw:
        hist = np.asarray(raw["depth_hist"], np.float64)  # [layers, L]: fraction of tokens at 1..L loops
        loops = np.arange(1, hist.shape[1] + 1)
        per_layer = hist @ loops
        mean_depth = float(raw["mean_depth"])
        out.update({
            "max_depth": m.max_depth,
            "depth_hist": hist.tolist(),
            "mean_depth_per_layer": per_layer.tolist(),
            "mean_depth": mean_depth,
            "mean_alpha": float(raw["mean_alpha"]),
            "depth_router_entropy": float(raw["depth_entropy"]),
        })
    if "expert_load" in raw:
        load = np.asarray(raw["expert_load"], np.float64)  # [layers, E]: fraction of token-slots per expert
        balance = load_balance(load)
        max_over_mean, cv = balance["max_over_mean"], balance["cv"]
        out.update({
            "n_experts": m.n_experts, "top_k": m.top_k,
            "expert_load_per_layer": load.tolist(),
            "expert_load": load.mean(0).tolist(),
            "expert_load_max_over_mean_per_layer": max_over_mean.tolist(),
            "expert_load_max_over_mean": float(max_over_mean.mean()),
            "expert_load_cv_per_layer": cv.tolist(),
            "expert_load_cv": float(cv.mean()),
            "router_entropy": float(raw["router_entropy"]),
            "router_entropy_max": math.log(m.n_experts),
            "balance_loss": float(raw["balance_loss"]),
            "z_loss": float(raw["z_loss"]),
        })

    out["flops_per_token_train"] = flops_lib.flops_per_token(m, seq_len, train=True)
    # inference three ways (perf/flops.py): ideal at the measured mean own depth, executed at the measured
    # mean (over layers and batches) of the executed loops per token, paper = FFN only with sparse experts
    executed_depth = float(np.mean(raw["executed_depth"])) if "executed_depth" in raw else None
    width_fraction = float(1.0 - np.mean(np.asarray(raw["depth_hist"])[:, -1])) if "depth_hist" in raw else None
    inference = flops_lib.inference_flops(m, seq_len, mean_depth=mean_depth, executed_depth=executed_depth,
                                          width_fraction=width_fraction)
    out.update(flops_lib.inference_flops_fields(inference))
    out["inference_depth_executed"] = inference["depth_executed"]  # the loops the executed figure counts (L if unmeasured)
    if mean_depth is not None:
        out["inference_flops_depth"] = mean_depth  # loops counted by the ideal figure: the measured mean depth
        out["inference_flops_executed_depth"] = executed_depth  # and by the executed one
        if executed_depth is not None:
            out["executed_depth_per_layer"] = [float(x) for x in np.ravel(raw["executed_depth"])]
    out["flops_per_token_inference_dense"] = flops_lib.flops_per_token(
        dataclasses.replace(m, ffn="dense"), seq_len, train=False)
    return out
