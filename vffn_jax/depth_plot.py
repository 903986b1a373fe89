"""The loops-per-layer figure of a depth-routed model (eval.py's depth_per_layer.png, W&B's eval/depth_per_layer).

Here, below both `evals` and `train`, so that either can draw it (vffn_jax.evals.summary re-exports it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vffn_jax import storage


def plot_depth(result: dict[str, Any], path: str | Path) -> Path:
    """Loops per layer (cf. the paper's Figure 4): stacked bars of the depth histogram per layer, with
    each layer's mean loop count on a second axis. Writes a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "depth_hist" not in result:
        raise ValueError(f"ffn={result.get('ffn')} has no depth histogram to plot")
    hist = np.asarray(result["depth_hist"], np.float64)
    n_layers, max_depth = hist.shape
    layers = np.arange(1, n_layers + 1)
    per_layer = hist @ np.arange(1, max_depth + 1)
    colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.9, max_depth))

    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * n_layers + 3.0), 4.2), dpi=120)
    bottom = np.zeros(n_layers)
    for d in range(max_depth):
        ax.bar(layers, hist[:, d], bottom=bottom, width=0.8, color=colors[d], edgecolor="white", linewidth=0.5,
               label=f"{d + 1} loop{'s' if d else ''}")
        bottom += hist[:, d]
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.set_xlim(0.4, n_layers + 0.6)

    ax2 = ax.twinx()
    ax2.plot(layers, per_layer, color="crimson", marker="o", linewidth=2, label="mean loops")
    for x, y in zip(layers, per_layer):
        ax2.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7,
                     color="crimson", bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    ax2.set_ylim(0.5, max_depth + 0.5)
    ax2.set_yticks(range(1, max_depth + 1))
    ax2.set_ylabel("mean loops (depth)", color="crimson")
    ax2.tick_params(axis="y", colors="crimson")

    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(handles[::-1] + h2, labels[::-1] + l2, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8,
              frameon=False)
    title = f"{result.get('scale', '')}/{result.get('variant', '')} step {result.get('step', '?')}: loops per layer"
    sub = f"mean depth {result['mean_depth']:.2f} of {max_depth}" if "mean_depth" in result else ""
    if "mean_alpha" in result:
        sub += f", mean alpha {result['mean_alpha']:.3f}"
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    fig.tight_layout()
    return storage.save_figure(fig, path)
