"""Statistics over seeds: means and spreads, the ordering verdict, the budget study's gaps and slopes."""
from __future__ import annotations

from typing import Any
import numpy as np
from vffn_jax.study.presets import ORDERING, ORDERING_TEXT, VARIANTS, WIDTH_ONLY_CHECK


# --------------------------------------------------------------------------- summary


def _std(x) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def aggregate(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{regime: {variant: mean/std/min/max of the loss over seeds, means of the other numbers}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["regime"], {}).setdefault(r["variant"], {"runs": []})["runs"].append(r)
    for regime, by_variant in out.items():
        for variant, agg in by_variant.items():
            runs = sorted(agg.pop("runs"), key=lambda r: r["seed"])
            losses = [r["loss"] for r in runs]
            agg.update({
                "seeds": [r["seed"] for r in runs], "losses": losses, "n": len(runs),
                "loss_mean": float(np.mean(losses)), "loss_std": _std(losses),
                "loss_min": float(np.min(losses)), "loss_max": float(np.max(losses)),
                "params_total": runs[0]["params_total"], "params_non_embedding": runs[0]["params_non_embedding"],
                "flops_per_token_train": runs[0]["flops_per_token_train"],
                **{k: float(np.mean([r.get(k, np.nan) for r in runs]))
                   for k in ("flops_per_token_inference", "flops_per_token_inference_executed",
                             "flops_per_token_inference_paper", "paper_ffn_vs_dense")},
                "tokens_per_sec": float(np.mean([r["tokens_per_sec"] for r in runs])),
                "mean_loops": float(np.mean([r["mean_loops"] for r in runs])),
                "mean_loops_std": _std([r["mean_loops"] for r in runs]),
                "tokens": runs[0]["tokens"], "steps": runs[0]["steps"],
                "wall_s": [r["wall_s"] for r in runs],
            })
            if runs[0]["mean_depth_per_layer"] is not None:
                layers = np.asarray([r["mean_depth_per_layer"] for r in runs])
                agg.update({"mean_depth_per_layer": layers.mean(0).tolist(),
                            "mean_depth_per_layer_min": layers.min(0).tolist(),
                            "mean_depth_per_layer_max": layers.max(0).tolist()})
            curves = [dict(map(tuple, r["curve"])) for r in runs]
            common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            agg["curve"] = [[s, float(np.mean([c[s] for c in curves]))] for s in common]
    return out


def ordering_verdict(losses: dict[str, list[float]], seeds: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Whether the paper's ordering (versatile < depth_only, width_shared < dense) held on mean held-out loss.

    `losses[variant]` are per-seed held-out losses (at equal tokens); `seeds[variant]` the matching seeds
    (default 0..n-1), used to count in how many seeds every comparison held. Returns `held` (True/False, or
    None when a variant is missing), the comparisons and a plain sentence quoting mean ± std over seeds;
    `width_only` (the routed-slices-only ablation, when trained) is reported after it as `width_only_check`
    (its comparisons with versatile and dense, not part of `held`).
    """
    needed = sorted({v for pair in ORDERING for v in pair})
    missing = [v for v in needed if not losses.get(v)]
    width_only = _width_only_check(losses)
    if missing:
        return {"held": None, "comparisons": [], "missing": missing, "width_only_check": width_only["comparisons"],
                "sentence": f"The paper's ordering ({ORDERING_TEXT}) cannot be checked: no results for "
                            f"{', '.join(missing)}." + width_only["sentence"]}
    seeds = seeds or {v: list(range(len(x))) for v, x in losses.items()}
    stats = {v: (float(np.mean(losses[v])), _std(losses[v]), len(losses[v])) for v in needed}
    per_seed = {v: dict(zip(seeds[v], losses[v])) for v in needed}
    common = sorted(set.intersection(*(set(per_seed[v]) for v in needed)))
    comps = []
    for a, b in ORDERING:
        gap = stats[b][0] - stats[a][0]
        comps.append({"better": a, "worse": b, "held": stats[a][0] < stats[b][0], "gap": gap,
                      "spread": max(stats[a][1], stats[b][1]),
                      "seeds_held": sum(per_seed[a][s] < per_seed[b][s] for s in common)})
    held = all(c["held"] for c in comps)
    every_seed = sum(all(per_seed[a][s] < per_seed[b][s] for a, b in ORDERING) for s in common)
    n = sorted({stats[v][2] for v in needed})
    single = n[-1] == 1
    fmt = {v: f"{v} {stats[v][0]:.4f}" + ("" if single else f" ± {stats[v][1]:.4f}") for v in needed}
    n_text = ("one seed, so no seed spread" if single else
              f"mean ± std over {n[0]} seeds" if len(n) == 1 else f"mean ± std over {n[0]}–{n[-1]} seeds")
    chain = f"{fmt['versatile']}; {fmt['depth_only']}; {fmt['width_shared']}; {fmt['dense']}"
    if held:
        tight = min(comps, key=lambda c: c["gap"])
        resolved = all(c["gap"] > c["spread"] for c in comps)
        sentence = (f"The paper's ordering ({ORDERING_TEXT}) held on mean held-out loss at equal tokens "
                    f"({chain}; {n_text})" + (
                        f"; the smallest gap is {tight['gap']:.4f} ({tight['better']} vs {tight['worse']}); with one "
                        "seed there is no spread to judge it against." if single else
                        f"; it held in {every_seed} of {len(common)} seed(s) individually, and the smallest gap "
                        f"({tight['better']} vs {tight['worse']}: {tight['gap']:.4f}) "
                        + ("is larger than the seed spread of every compared pair." if resolved else
                           f"is {'larger' if tight['gap'] > tight['spread'] else 'not larger'} than that pair's seed "
                           f"spread ({tight['spread']:.4f}); some gaps are within the seed spread.")))
    else:
        def pair(c: dict[str, Any]) -> str:
            return (f"{c['better']} ({stats[c['better']][0]:.4f}) is {'' if c['held'] else 'not '}below {c['worse']} "
                    f"({stats[c['worse']][0]:.4f}; gap {c['gap']:+.4f}"
                    + ("" if single else f", seed spread {c['spread']:.4f}, held in {c['seeds_held']} of "
                                         f"{len(common)} seeds") + ")")

        failed = "; ".join(pair(c) for c in comps if not c["held"])
        kept = "; ".join(pair(c) for c in comps if c["held"])
        sentence = (f"The paper's ordering ({ORDERING_TEXT}) did NOT hold on mean held-out loss at equal tokens "
                    f"({chain}; {n_text}): {failed}." + (f" Of its comparisons these held: {kept}." if kept else ""))
    return {"held": held, "comparisons": comps, "seeds_all_held": every_seed, "seeds_compared": len(common),
            "width_only_check": width_only["comparisons"], "sentence": sentence + width_only["sentence"]}


def _width_only_check(losses: dict[str, list[float]]) -> dict[str, Any]:
    """width_only (the k routed slices alone) against versatile and dense, reported beside the verdict."""
    if not losses.get("width_only"):
        return {"comparisons": [], "sentence": ""}
    mean = {v: float(np.mean(x)) for v, x in losses.items() if x}
    comps = [{"better": a, "worse": b, "held": mean[a] < mean[b], "gap": mean[b] - mean[a]}
             for a, b in WIDTH_ONLY_CHECK if a in mean and b in mean]
    parts = [f"{'below' if c['held'] else 'NOT below'} {c['worse']} ({mean[c['worse']]:.4f})" if c["better"] ==
             "width_only" else f"{'above' if c['held'] else 'NOT above'} {c['better']} ({mean[c['better']]:.4f})"
             for c in comps]
    sentence = (f" Beside it, width_only (the k routed slices alone, a strict sub-network of dense; not part of the "
                f"verdict) has {mean['width_only']:.4f}" + (": " + ", ".join(parts) if parts else "") + ".")
    return {"comparisons": comps, "sentence": sentence}


def budget_gaps(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gap to dense per (width, budget, variant): loss(variant, seed) - loss(dense, seed) over the seeds
    where both finished; mean, sample std, min, max and n of the gaps, and the variant's own loss over its
    finished seeds. Sorted by variant (VARIANTS order), width, budget."""
    by: dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]] = {}
    for r in results:
        by.setdefault((r["width"], r["tokens_per_param"]), {}).setdefault(r["variant"], {})[r["seed"]] = r
    rows = []
    for (w, tpp), variants in by.items():
        dense = {s: r["loss"] for s, r in variants.get("dense", {}).items()}
        for v, runs in variants.items():
            seeds = sorted(s for s in runs if s in dense)
            gaps = [runs[s]["loss"] - dense[s] for s in seeds]
            losses = [runs[s]["loss"] for s in sorted(runs)]
            any_run = next(iter(runs.values()))
            rows.append({
                "width": w, "tokens_per_param": tpp, "tpp": any_run["tpp"], "tokens": any_run["tokens"],
                "steps": any_run["steps"], "params_dense": any_run["params_dense"], "variant": v,
                "params_total": any_run["params_total"],
                "seeds": seeds, "gaps": gaps, "n": len(gaps),
                "gap_mean": float(np.mean(gaps)) if gaps else None, "gap_std": _std(gaps) if gaps else None,
                "gap_min": float(np.min(gaps)) if gaps else None, "gap_max": float(np.max(gaps)) if gaps else None,
                "loss_seeds": sorted(runs), "losses": losses, "loss_mean": float(np.mean(losses)),
                "loss_std": _std(losses),
                "tokens_per_sec": float(np.mean([r["tokens_per_sec"] for r in runs.values()])),
                "mean_loops": float(np.mean([r["mean_loops"] for r in runs.values()])),
            })
    order = list(VARIANTS)
    rows.sort(key=lambda r: (order.index(r["variant"]) if r["variant"] in order else len(order), r["width"],
                             r["tokens_per_param"]))
    return rows


def budget_trends(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, width), not dense: the gap at the smallest and the largest budget with gaps, its change,
    and whether that change is larger than the two points' seed spreads (std) added."""
    out = []
    keys = sorted({(r["variant"], r["width"]) for r in rows if r["variant"] != "dense"},
                  key=lambda k: (list(VARIANTS).index(k[0]) if k[0] in VARIANTS else 99, k[1]))
    for v, w in keys:
        pts = sorted((r for r in rows if (r["variant"], r["width"]) == (v, w) and r["n"]),
                     key=lambda r: r["tokens_per_param"])
        if not pts:
            continue
        lo, hi = pts[0], pts[-1]
        change = hi["gap_mean"] - lo["gap_mean"]
        spread = lo["gap_std"] + hi["gap_std"]
        slope, slope_se = _gap_slope([np.log10(r["tpp"]) for r in pts for _ in r["gaps"]],
                                     [g for r in pts for g in r["gaps"]])
        out.append({"variant": v, "width": w, "tpp_low": lo["tokens_per_param"], "gap_low": lo["gap_mean"],
                    "n_low": lo["n"], "tpp_high": hi["tokens_per_param"], "gap_high": hi["gap_mean"],
                    "n_high": hi["n"], "change": change, "spread": spread,
                    "resolved": bool(len(pts) > 1 and min(lo["n"], hi["n"]) > 1 and abs(change) > spread),
                    "points": len(pts), "slope_per_decade": slope, "slope_se": slope_se,
                    "below_dense_high": sum(g < 0 for g in hi["gaps"])})
    return out


def _gap_slope(x: list[float], y: list[float]) -> tuple[float | None, float | None]:
    """Least-squares slope of the seed-level gaps against log10(tokens/param) (nats per 10x budget) and its
    standard error (None below 3 gaps or 2 budgets). Seeds are treated as independent draws."""
    x_, y_ = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x_) < 3 or np.ptp(x_) == 0:
        return None, None
    xc = x_ - x_.mean()
    slope = float(xc @ (y_ - y_.mean()) / (xc @ xc))
    resid = y_ - y_.mean() - slope * xc
    return slope, float(np.sqrt(resid @ resid / (len(x_) - 2) / (xc @ xc)))
