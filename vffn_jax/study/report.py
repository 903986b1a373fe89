"""results.md / results.json and the PNG plots of a study (the regimes' tables and the budget report)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any
import numpy as np
from vffn_jax import storage
from vffn_jax.study.presets import REGIMES, VARIANTS
from vffn_jax.study.stats import aggregate, budget_gaps, budget_trends, ordering_verdict


def _si(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


REGIME_TITLES = {"scratch": "From scratch", "continued": "Continued from the dense checkpoint (dense_base)"}


def write_results(out, results: list[dict[str, Any]], meta: dict[str, Any], base: dict[str, Any] | None,
                  variants: list[str]) -> dict[str, Any]:
    """results.json, results.md and the plots; returns the results.json object."""
    agg = aggregate(results)
    verdicts = {regime: ordering_verdict({v: a["losses"] for v, a in by.items()},
                                         {v: a["seeds"] for v, a in by.items()})
                for regime, by in agg.items()}
    plots = write_plots(out, agg, variants)
    doc = {"meta": meta, "dense_base": base, "regimes": agg, "ordering": verdicts, "plots": plots, "runs": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1))

    lines = [f"# VersatileFFN study ({meta['preset']} preset)", ""]
    lines += [f"- model: {meta['model']}", f"- data: {meta['data']}",
              f"- every run: {meta['steps']} steps x {meta['batch_size']} x {meta['seq_len']} tokens = "
              f"{meta['tokens_per_run']:,} tokens (equal tokens for all variants); seeds {meta['seeds']} "
              "(train.seed = seed; data.shuffle_seed = seed for dense_base and scratch runs, a seed derived from "
              "(\"continued\", seed) for continued runs, so a continuation never replays dense_base's batches)",
              f"- held-out loss: {meta['eval_tokens']:,} tokens of held-out documents, the same for every run; "
              "reported as mean ± std (sample std over seeds) with the min–max",
              "- FLOPs/token: analytic (vffn_jax.flops, matmuls). Inference three ways: *ideal* = each token at its "
              "own depth (the measured mean depth on the held-out data); *executed* = what the evaluation batches "
              "ran (the depth loops as model.depth_exec runs them, block padding counted; moe's dense dispatch runs all E "
              "experts); *paper* = the paper's Table 2 convention, FFN matmuls only with sparse experts (width path "
              "counted only for tokens with alpha > 0), also given as a multiple of the dense FFN",
              "- tokens/s: measured training throughput (median over logging windows, mean over seeds) on "
              + meta["device"], ""]
    for regime in [r for r in REGIMES if r in agg]:
        by = agg[regime]
        lines += [f"## {REGIME_TITLES[regime]}", ""]
        if regime == "continued" and base is not None:
            lines += [f"Dense base before continuation ({base['steps']} steps, seed 0): held-out loss "
                      f"{base['loss']:.4f}. Every continued run then trains {meta['steps']} more steps from it "
                      "(optimizer and schedule reset, routers/experts new).", ""]
        lines += ["| variant | held-out loss (mean ± std) | min–max | params (total) | train FLOPs/token | "
                  "inference FLOPs/token ideal | executed | paper (FFN only, x dense) | tokens/s | mean loops |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for v in [v for v in variants if v in by]:
            a = by[v]
            loops = f"{a['mean_loops']:.2f}" + (f" ± {a['mean_loops_std']:.2f}" if a["mean_loops_std"] else "")
            spread = f" ± {a['loss_std']:.4f}" if a["n"] > 1 else ""
            lines.append(f"| {v} | {a['loss_mean']:.4f}{spread} (n={a['n']}) | "
                         f"{a['loss_min']:.4f}–{a['loss_max']:.4f} | {a['params_total']:,} | "
                         f"{_si(a['flops_per_token_train'])} | {_si(a['flops_per_token_inference'])} | "
                         f"{_si(a.get('flops_per_token_inference_executed'))} | "
                         f"{_si(a.get('flops_per_token_inference_paper'))} ({a.get('paper_ffn_vs_dense', math.nan):.2f}x) | "
                         f"{a['tokens_per_sec']:,.0f} | {loops} |")
        lines += ["", f"**Ordering.** {verdicts[regime]['sentence']}", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    lines += ["## Runs", "", "| regime | variant | seed | held-out loss | wall s | workdir |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in ([base] if base else []) + results:
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "–"
        lines.append(f"| {r['regime']} | {r['variant']} | {r['seed']} | {r['loss']:.4f} | {wall} | "
                     f"{os.path.relpath(r['workdir'], out)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return doc


def _label_axes(ax, title: str, xlabel: str, ylabel: str, *, log_x: bool = False, legend_size: int = 8,
                legend_cols: int = 1) -> None:
    """The study plots' common axis dressing: title, labels, grid, legend (log x for budgets)."""
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if log_x else "major")
    ax.legend(fontsize=legend_size, ncol=legend_cols)


def write_plots(out, agg: dict[str, dict[str, dict[str, Any]]], variants: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = [r for r in REGIMES if r in agg]
    colors = dict(zip(VARIANTS, plt.get_cmap("tab10").colors))
    paths = []
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.5), dpi=110, squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        lo, hi = np.inf, -np.inf
        for v in [v for v in variants if v in agg[regime]]:
            curve = np.asarray(agg[regime][v]["curve"], np.float64).reshape(-1, 2)
            if len(curve):
                ax.plot(curve[:, 0], curve[:, 1], label=f"{v} ({agg[regime][v]['loss_mean']:.3f})",
                        color=colors[v], linewidth=1.4)
                tail = curve[curve[:, 0] >= 0.2 * curve[-1, 0], 1]  # zoom past the first 20% of training
                lo, hi = min(lo, curve[:, 1].min()), max(hi, tail.max() if len(tail) else curve[:, 1].max())
        if np.isfinite(lo) and hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        _label_axes(ax, f"{REGIME_TITLES[regime]}\ntraining loss, mean over seeds (legend: held-out loss)",
                    "step", "training loss (nats/token)")
    fig.tight_layout()
    path = out / "loss_curves.png"
    storage.save_figure(fig, path)
    paths.append(str(path))

    depth_regimes = [r for r in regimes if any("mean_depth_per_layer" in a for a in agg[r].values())]
    if depth_regimes:
        fig, axes = plt.subplots(1, len(depth_regimes), figsize=(6 * len(depth_regimes), 4.2), dpi=110, squeeze=False)
        for ax, regime in zip(axes[0], depth_regimes):
            max_depth = 1
            for v in [v for v in variants if "mean_depth_per_layer" in agg[regime].get(v, {})]:
                a = agg[regime][v]
                y = np.asarray(a["mean_depth_per_layer"])
                x = np.arange(1, len(y) + 1)
                ax.plot(x, y, marker="o", color=colors[v], label=f"{v} (mean {a['mean_loops']:.2f})")
                ax.fill_between(x, a["mean_depth_per_layer_min"], a["mean_depth_per_layer_max"], color=colors[v],
                                alpha=0.15, linewidth=0)
                max_depth = max(max_depth, int(np.ceil(np.max(a["mean_depth_per_layer_max"]))))
                ax.set_xticks(x)
            ax.set_ylim(0.8, max(max_depth, 2) + 0.2)
            _label_axes(ax, f"{REGIME_TITLES[regime]}\nmean loops per layer on held-out data (band: min–max over "
                        "seeds)", "layer", "mean loops (depth)")
        fig.tight_layout()
        path = out / "loops_per_layer.png"
        storage.save_figure(fig, path)
        paths.append(str(path))
    return paths


def _trend_sentence(t: dict[str, Any]) -> str:
    if t["points"] < 2:
        return (f"{t['variant']} at d_model {t['width']}: gap {t['gap_low']:+.4f} at {t['tpp_low']:g} tokens/param "
                f"(one budget finished)")
    # gap < 0 is better than dense, so a falling gap means the variant gains on dense as the budget grows
    direction = "gains on dense" if t["change"] < 0 else "falls behind dense"
    sign = "" if (t["gap_low"] > 0) == (t["gap_high"] > 0) else ", crossing zero"
    judge = (f"larger than the seed spread, std sum {t['spread']:.4f}" if t["resolved"] else
             f"within the seed spread, std sum {t['spread']:.4f}" if min(t["n_low"], t["n_high"]) > 1 else
             "no seed spread to judge it")
    fit = ""
    if t.get("slope_per_decade") is not None:
        steady = abs(t["slope_per_decade"]) <= 2 * t["slope_se"]
        fit = (f"; fit over {t['points']} budgets: {t['slope_per_decade']:+.4f} ± {t['slope_se']:.4f} nats per 10x "
               f"tokens/param ({'not distinguishable from flat' if steady else 'more than 2 standard errors'})")
    return (f"{t['variant']} at d_model {t['width']}: {t['gap_low']:+.4f} at {t['tpp_low']:g} tokens/param "
            f"(n={t['n_low']}) -> {t['gap_high']:+.4f} at {t['tpp_high']:g} (n={t['n_high']}, below dense in "
            f"{t['below_dense_high']} of {t['n_high']} seeds): the variant {direction}{sign} (change {t['change']:+.4f}, "
            f"{judge}){fit}")


def write_budget_results(out, results: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """results.json, results.md and gap_vs_budget.png of a budget study, from whatever runs finished."""
    out = storage.as_path(out)
    rows = budget_gaps(results)
    trends = budget_trends(rows)
    plots = write_budget_plot(out, rows) if rows else []
    doc = {"meta": meta, "budget": {"points": rows, "trends": trends}, "plots": plots, "runs": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1))

    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    others = [v for v in variants if v != "dense"]
    lines = [f"# VersatileFFN budget study ({meta['preset']} preset)", ""]
    lines += [f"- model: {meta['model']}", f"- data: {meta['data']}",
              f"- grid: d_model {', '.join(map(str, meta['widths']))} x tokens/param "
              f"{', '.join(f'{x:g}' for x in meta['tokens_per_param'])} x {', '.join(variants)}; "
              f"seeds {meta['seeds']}; from scratch; {meta['finished']} of {meta['planned']} runs finished",
              "- tokens/param: training tokens / dense's analytic parameter count at that width (embeddings "
              "included); every variant at a point trains the same tokens (same steps, batch, sequence length)",
              "- gap to dense: held-out loss of the variant minus dense's at the same width, budget and seed "
              "(nats/token; negative = better than dense), mean ± sample std over the seeds where both finished, "
              "with n; held-out set: " + f"{meta['eval_tokens']:,} tokens, the same for every run",
              f"- device: {meta['device']}", ""]
    lines += ["## Gap to dense vs budget", "",
              "| d_model | tokens/param (actual) | tokens | dense loss | "
              + " | ".join(f"{v} gap" for v in others) + " |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in others) + " |"]
    cell = {(r["variant"], r["width"], r["tokens_per_param"]): r for r in rows}
    for w, tpp in sorted({(r["width"], r["tokens_per_param"]) for r in rows}):
        d = cell.get(("dense", w, tpp))
        dense_txt = (f"{d['loss_mean']:.4f}" + (f" ± {d['loss_std']:.4f}" if len(d["losses"]) > 1 else "")
                     + f" (n={len(d['losses'])})") if d else "–"
        any_r = next(r for r in rows if (r["width"], r["tokens_per_param"]) == (w, tpp))
        cells = []
        for v in others:
            r = cell.get((v, w, tpp))
            if r is None or not r["n"]:
                cells.append("–")
            else:
                cells.append(f"{r['gap_mean']:+.4f}" + (f" ± {r['gap_std']:.4f}" if r["n"] > 1 else "")
                             + f" (n={r['n']})")
        lines.append(f"| {w} | {tpp:g} ({any_r['tpp']:.2f}) | {any_r['tokens']:,} | {dense_txt} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## How each gap moves with budget", ""]
    lines += [f"- {_trend_sentence(t)}." for t in trends] or ["- no gaps yet (no point has dense and a variant "
                                                              "finished with the same seed)."]
    lines += [""]
    if plots:
        lines += ["## Plot", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    lines += ["## Runs", "", "| d_model | tokens/param | variant | seed | held-out loss | tokens/s | wall s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r["width"], r["tokens_per_param"], list(VARIANTS).index(r["variant"]),
                                            r["seed"])):
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "–"
        lines.append(f"| {r['width']} | {r['tokens_per_param']:g} | {r['variant']} | {r['seed']} | {r['loss']:.4f} | "
                     f"{r['tokens_per_sec']:,.0f} | {wall} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return doc


def write_budget_plot(out, rows: list[dict[str, Any]]) -> list[str]:
    """gap_vs_budget.png: left, gap to dense vs tokens/param (log x), one line per variant (colour) and width
    (line style, marker), error bars = sample std over seeds; right, dense's own held-out loss per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = storage.as_path(out)
    colors = dict(zip(VARIANTS, plt.get_cmap("tab10").colors))
    widths = sorted({r["width"] for r in rows})
    styles = dict(zip(widths, [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")] * 4))
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), dpi=110, gridspec_kw={"width_ratios": [2, 1]})
    ax.axhline(0.0, color="black", linewidth=0.8)
    for i, v in enumerate([v for v in variants if v != "dense"]):
        for w in widths:
            pts = sorted((r for r in rows if r["variant"] == v and r["width"] == w and r["n"]),
                         key=lambda r: r["tpp"])
            if not pts:
                continue
            jitter = 1.0 + 0.025 * (i - (len(variants) - 2) / 2)  # keeps the error bars apart
            x = np.array([r["tpp"] for r in pts]) * jitter
            y = np.array([r["gap_mean"] for r in pts])
            err = np.array([r["gap_std"] if r["n"] > 1 else 0.0 for r in pts])
            ls, mk = styles[w]
            ax.errorbar(x, y, yerr=err, color=colors[v], linestyle=ls, marker=mk, markersize=4, capsize=2.5,
                        linewidth=1.3, label=f"{v}, d_model {w}")
    _label_axes(ax, "gap to dense at the same width, budget and seed\n(mean over seeds; bars: sample std; "
                "below 0 = better than dense)", "training tokens per parameter (dense's analytic count)",
                "held-out loss minus dense's (nats/token)", log_x=True, legend_size=7, legend_cols=2)
    for w in widths:
        pts = sorted((r for r in rows if r["variant"] == "dense" and r["width"] == w), key=lambda r: r["tpp"])
        if pts:
            ls, mk = styles[w]
            ax2.errorbar([r["tpp"] for r in pts], [r["loss_mean"] for r in pts],
                         yerr=[r["loss_std"] for r in pts], color=colors["dense"], linestyle=ls, marker=mk,
                         markersize=4, capsize=2.5, label=f"dense, d_model {w}")
    _label_axes(ax2, "dense's held-out loss (the reference)", "training tokens per parameter",
                "held-out loss (nats/token)", log_x=True, legend_size=7)
    fig.tight_layout()
    path = out / "gap_vs_budget.png"
    storage.save_figure(fig, path)
    return [str(path)]
