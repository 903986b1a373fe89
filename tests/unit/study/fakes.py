"""Fake study results shared by the study tests."""
from __future__ import annotations


def fake_budget_results():
    """Budget-study result rows: 2 widths x 2 budgets x 3 seeds of dense, kloop4 and versatile (one dense run
    unfinished)."""
    out = []
    for w, base in ((32, 2.5), (48, 2.3)):
        for tpp, drop in ((1, 0.0), (20, 0.5)):
            for seed in range(3):
                for v, gap in (("dense", 0.0), ("kloop4", 0.05 - 0.04 * (tpp == 20)), ("versatile", -0.02 * seed)):
                    if (w, tpp, v, seed) == (48, 20, "dense", 2):
                        continue  # an unfinished dense run: seed 2 drops out of that point's gaps
                    out.append({"width": w, "tokens_per_param": tpp, "tpp": tpp * 1.01, "tokens": tpp * 1000,
                                "steps": tpp * 10, "params_dense": 1000, "params_total": 1000, "variant": v,
                                "seed": seed, "loss": base - drop + gap + 0.01 * seed, "tokens_per_sec": 5000.0,
                                "mean_loops": 1.0, "wall_s": 1.0, "regime": "budget"})
    return out
