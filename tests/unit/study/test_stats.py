"""Study statistics (vffn_jax/study/stats.py): the ordering verdict computed from numbers, and the budget
study's gaps to dense and their trends over budgets."""
from __future__ import annotations

import numpy as np
import pytest

from tests.unit.study.fakes import fake_budget_results
from vffn_jax.study.report import _trend_sentence
from vffn_jax.study.stats import budget_gaps, budget_trends, ordering_verdict


def test_ordering_held_from_numbers():
    losses = {"versatile": [2.00, 2.01, 2.02], "depth_only": [2.05, 2.06, 2.04], "width_shared": [2.07, 2.08, 2.06],
              "dense": [2.10, 2.12, 2.11], "moe": [1.0]}
    v = ordering_verdict(losses)
    assert v["held"] is True
    assert v["seeds_all_held"] == 3 and v["seeds_compared"] == 3
    assert "held on mean held-out loss" in v["sentence"] and "NOT" not in v["sentence"]
    assert "versatile 2.0100 ± 0.0100" in v["sentence"]  # mean ± sample std, from the numbers
    assert [c["held"] for c in v["comparisons"]] == [True] * 4


def test_ordering_not_held_names_the_failed_comparison():
    losses = {"versatile": [2.00, 2.02], "depth_only": [2.05, 2.06], "width_shared": [2.15, 2.13],
              "dense": [2.10, 2.12]}
    v = ordering_verdict(losses)
    assert v["held"] is False
    assert "did NOT hold" in v["sentence"]
    assert "width_shared (2.1400) is not below dense (2.1100" in v["sentence"]
    failed = [c for c in v["comparisons"] if not c["held"]]
    assert [(c["better"], c["worse"]) for c in failed] == [("width_shared", "dense")]
    # the comparisons that held are named too, after the failed one
    held_part = v["sentence"].split("Of its comparisons these held: ")[1]
    assert "versatile (2.0100) is below depth_only (2.0550; gap +0.0450" in held_part and "not below" not in held_part


def test_ordering_within_spread_and_per_seed_count():
    # means in order but seed 1 reverses versatile vs depth_only: held on means, 1 of 2 seeds
    losses = {"versatile": [2.00, 2.10], "depth_only": [2.08, 2.04], "width_shared": [2.09, 2.09],
              "dense": [2.20, 2.20]}
    v = ordering_verdict(losses)
    assert v["held"] is True and v["seeds_all_held"] == 1
    assert "1 of 2 seed(s)" in v["sentence"] and "within the seed spread" in v["sentence"]


def test_ordering_missing_variant():
    v = ordering_verdict({"versatile": [1.0], "dense": [2.0]})
    assert v["held"] is None and "cannot be checked" in v["sentence"]
    assert set(v["missing"]) == {"depth_only", "width_shared"}


def test_ordering_uses_width_shared_and_reports_width_only():
    losses = {"versatile": [2.00], "depth_only": [2.05], "width_shared": [2.06], "width_only": [2.15],
              "dense": [2.10]}
    v = ordering_verdict(losses)
    assert v["held"] is True
    assert ("versatile", "width_shared") in [(c["better"], c["worse"]) for c in v["comparisons"]]
    assert "width_shared 2.0600" in v["sentence"]
    assert "width_only (the k routed slices alone" in v["sentence"] and "NOT below dense (2.1000)" in v["sentence"]
    assert [c["held"] for c in v["width_only_check"]] == [True, False]
    assert "width_only" not in ordering_verdict({k: x for k, x in losses.items() if k != "width_only"})["sentence"]


def test_budget_gaps_from_fake_numbers():
    rows = {(r["variant"], r["width"], r["tokens_per_param"]): r for r in budget_gaps(fake_budget_results())}
    k = rows[("kloop4", 32, 1)]
    assert k["n"] == 3 and k["gap_mean"] == pytest.approx(0.05) and k["gap_std"] == pytest.approx(0.0, abs=1e-12)
    v = rows[("versatile", 32, 20)]
    assert v["gaps"] == pytest.approx([0.0, -0.02, -0.04]) and v["gap_std"] == pytest.approx(0.02)
    assert (v["gap_min"], v["gap_max"]) == (pytest.approx(-0.04), pytest.approx(0.0))
    v48 = rows[("versatile", 48, 20)]
    assert v48["seeds"] == [0, 1] and v48["n"] == 2 and v48["loss_seeds"] == [0, 1, 2]  # no dense seed 2
    assert rows[("dense", 48, 20)]["gap_mean"] == 0.0 and rows[("dense", 48, 20)]["n"] == 2
    trends = {(t["variant"], t["width"]): t for t in budget_trends(list(rows.values()))}
    assert ("dense", 32) not in trends
    t = trends[("kloop4", 32)]
    assert t["gap_low"] == pytest.approx(0.05) and t["gap_high"] == pytest.approx(0.01) and t["resolved"]
    assert "the variant gains on dense" in _trend_sentence(t)
    # kloop4's gap falls by 0.04 over log10(20) decades, the same for every seed: an exact fit, zero error
    assert t["slope_per_decade"] == pytest.approx(-0.04 / np.log10(20)) and t["slope_se"] == pytest.approx(0, abs=1e-9)
    assert t["below_dense_high"] == 0 and "more than 2 standard errors" in _trend_sentence(t)
    flat = trends[("versatile", 32)]  # gaps 0, -0.02, -0.04 at both budgets: slope 0, seed noise only
    assert flat["slope_per_decade"] == pytest.approx(0, abs=1e-12) and flat["slope_se"] > 0
    assert flat["below_dense_high"] == 2 and "not distinguishable from flat" in _trend_sentence(flat)
