"""The one-command study (vffn_jax/study/runner.py): a micro end-to-end study writes results.md/json and the
plots, and skips finished runs when re-run."""
from __future__ import annotations

import json
import re

import pytest

from vffn_jax.study.report import REGIME_TITLES
from vffn_jax.study.runner import run_study


@pytest.mark.slow  # 5 runs; the dense and versatile train steps at the micro shape compile cold in ~30 s
def test_micro_study_end_to_end(tmp_path):
    """dense_base, then dense and versatile from scratch and continued: results.md has both regimes' tables
    and the ordering sentence, results.json the routing and FLOP numbers, the plots exist; the same command
    again reuses all 5 finished runs."""
    logs = []
    doc = run_study("micro", tmp_path, seeds=1, variants=["dense", "versatile"], log=logs.append)
    for name in ("results.md", "results.json", "loss_curves.png", "loops_per_layer.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "results.md").read_text()
    for regime in ("scratch", "continued"):
        table = md.split(REGIME_TITLES[regime])[1].split("**Ordering.**")[0]
        rows = re.findall(r"^\| (\w+) \| \d", table, flags=re.M)
        assert rows == ["dense", "versatile"], (regime, rows)
        assert set(doc["regimes"][regime]) == {"dense", "versatile"}
    assert "cannot be checked" in md  # only 2 of the 4 ordered variants were trained
    saved = json.loads((tmp_path / "results.json").read_text())
    vers = saved["regimes"]["continued"]["versatile"]
    assert 1.0 <= vers["mean_loops"] <= 4.0 and len(vers["mean_depth_per_layer"]) == 2
    assert vers["flops_per_token_train"] > saved["regimes"]["continued"]["dense"]["flops_per_token_train"]
    assert saved["dense_base"]["loss"] > 0 and all(r["tokens_per_sec"] > 0 for r in saved["runs"])
    assert all(r["init_from"] for r in saved["runs"] if r["regime"] == "continued")
    assert (tmp_path / "continued" / "versatile" / "seed0" / "checkpoints").is_dir()
    # re-running the same command reuses every finished run
    logs.clear()
    again = run_study("micro", tmp_path, seeds=1, variants=["dense", "versatile"], log=logs.append)
    assert sum("finished, reusing" in line for line in logs) == 5
    assert not any("trained in" in line for line in logs)
    assert again["regimes"]["scratch"]["dense"]["loss_mean"] == doc["regimes"]["scratch"]["dense"]["loss_mean"]
