"""Held-out evaluation of a saved run: loss, perplexity, depth/expert routing statistics, FLOPs (docs/method.md).

`evaluate_run(workdir)` reads the run's `config.json`, rebuilds the model abstractly for the devices
that exist *now*, restores the parameters only (never the optimizer state or the data iterator) from
`checkpoints/<step>/params`, runs the inference-mode forward (`train.step.make_eval_step`: no Gumbel
noise, each token runs its own argmax depth) over the first `n_batches` unshuffled batches of the
validation split, and returns a flat dict of plain Python numbers and lists.

Device adaptation (the run may have been trained on another device count):
  * the saved mesh is kept when it fits the devices and divides the batch (`config.validate`);
    otherwise the mesh becomes pure data parallelism over every device (`data=-1, fsdp=1, tensor=1`);
    Orbax reshards the saved parameters into the new layout either way;
  * the eval batch is the run's `train.batch_size`, so the evaluated tokens are exactly the ones
    training's `eval/` rows used. Only if the data-parallel size does not divide it, the eval batch
    is shrunk to the largest multiple of the device count below it (or raised to the device count when
    the batch has fewer rows than there are devices); the held-out tokens then differ from training's
    (a prefix of the same split). `result["notes"]` says when either adaptation happened.

Routing statistics are means over the evaluated tokens. Expert-load max/mean and CV are computed
per layer from the load aggregated over all evaluated tokens (`train.step.load_balance`, as training's
`eval/` rows do), then averaged over layers.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vffn_jax import config as config_lib
from vffn_jax import storage
from vffn_jax.checkpoint.restore import restore_params
from vffn_jax.config import DEPTH_KINDS, ConfigError


PLOT_NAME = "depth_per_layer.png"


# --------------------------------------------------------------------------- evaluation


def evaluate_run(workdir: str | Path, *, step: int | None = None, n_batches: int | None = None,
                 devices: Sequence[Any] | None = None, plot: bool = True) -> dict[str, Any]:
    """Evaluates a run's checkpoint on held-out data; see the module docstring for what is returned.

    Raises FileNotFoundError (missing workdir/config/checkpoints; StepNotFoundError for an unknown
    step), ConfigError (invalid saved config), ckpt.CheckpointMismatchError (config and checkpoint disagree).
    """
    import jax

    from vffn_jax.data import pipeline as data_lib
    from vffn_jax.perf import flops as flops_lib
    from vffn_jax.train import step as step_lib

    if n_batches is not None and n_batches < 1:
        raise ConfigError(f"number of eval batches must be >= 1, got {n_batches}")
    run = restore_params(workdir, step, devices)
    workdir, step, cfg, s, params, eval_batch, notes = (run.workdir, run.step, run.cfg, run.setup, run.params,
                                                        run.eval_batch, run.notes)
    devices = list(s.mesh.devices.flat)
    n_batches = cfg.run.eval_batches if n_batches is None else n_batches

    batches = data_lib.eval_batches(cfg.data, seq_len=cfg.train.seq_len, global_batch=eval_batch, n_batches=n_batches,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    eval_step = step_lib.make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)
    raw = step_lib.evaluate(eval_step, params, batches, s.mesh)
    if len(batches) < n_batches:
        notes.append(f"the validation split holds only {len(batches)} batch(es) of {eval_batch} x "
                     f"{cfg.train.seq_len} tokens; evaluated those")

    m = cfg.model
    counts = flops_lib.count_params(s.abstract_params)
    result: dict[str, Any] = {
        "workdir": str(workdir), "step": step, "scale": cfg.scale, "variant": cfg.variant, "ffn": m.ffn,
        "loss": raw["loss"], "perplexity": raw["perplexity"],
        "eval_batches": len(batches), "eval_batch_size": eval_batch, "seq_len": cfg.train.seq_len,
        "eval_tokens": len(batches) * eval_batch * cfg.train.seq_len,
        "mesh": dict(zip(s.mesh.axis_names, (int(x) for x in s.mesh.devices.shape))),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        **counts,
    }

    mean_depth = None
    if "depth_hist" in raw:
        hist = np.asarray(raw["depth_hist"], np.float64)  # [layers, L]: fraction of tokens at 1..L loops
        loops = np.arange(1, hist.shape[1] + 1)
        per_layer = hist @ loops
        mean_depth = float(raw["mean_depth"])
        result.update({
            "max_depth": m.max_depth,
            "depth_hist": hist.tolist(),
            "mean_depth_per_layer": per_layer.tolist(),
            "mean_depth": mean_depth,
            "mean_alpha": float(raw["mean_alpha"]),
            "depth_router_entropy": float(raw["depth_entropy"]),
            "tau": float(config_lib.tau_at(step, cfg.train)),  # Gumbel temperature training had reached
        })
    if "expert_load" in raw:
        load = np.asarray(raw["expert_load"], np.float64)  # [layers, E]: fraction of token-slots per expert
        balance = step_lib.load_balance(load)
        max_over_mean, cv = balance["max_over_mean"], balance["cv"]
        result.update({
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

    result["flops_per_token_train"] = flops_lib.flops_per_token(m, cfg.train.seq_len, train=True)
    # inference three ways (vffn_jax/flops.py): ideal at the measured mean own depth, executed at the measured
    # mean (over layers and batches) of each batch's deepest token, paper = FFN only with sparse experts
    executed_depth = float(np.mean(raw["executed_depth"])) if "executed_depth" in raw else None
    width_fraction = float(1.0 - np.mean(np.asarray(raw["depth_hist"])[:, -1])) if "depth_hist" in raw else None
    inference = flops_lib.inference_flops(m, cfg.train.seq_len, mean_depth=mean_depth, executed_depth=executed_depth,
                                          width_fraction=width_fraction)
    result.update(flops_lib.inference_flops_fields(inference))
    if mean_depth is not None:
        result["inference_flops_depth"] = mean_depth  # loops counted by the ideal figure: the measured mean depth
        result["inference_flops_executed_depth"] = executed_depth  # and by the executed one
        result["executed_depth_per_layer"] = [float(x) for x in np.ravel(raw["executed_depth"])]
    result["flops_per_token_inference_dense"] = flops_lib.flops_per_token(
        dataclasses.replace(m, ffn="dense"), cfg.train.seq_len, train=False)

    if m.ffn in DEPTH_KINDS:
        path = workdir / PLOT_NAME
        if plot and jax.process_index() == 0:
            plot_depth(result, path)
            result["depth_plot"] = str(path)
        else:
            result["depth_plot"] = None
            result["depth_plot_note"] = "plot not requested"
    else:
        result["depth_plot"] = None
        result["depth_plot_note"] = f"skipped: ffn={m.ffn} has no depth router (every token runs a fixed number of loops)"
    result["notes"] = notes
    return result


# --------------------------------------------------------------------------- figure


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
