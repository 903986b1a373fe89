"""The study's report (vffn_jax/study/report.py): the budget study's results.md, results.json and plot."""
from __future__ import annotations

import json

from tests.unit.study.fakes import fake_budget_results
from vffn_jax.study.report import write_budget_results


def test_budget_writer_on_fake_results(tmp_path):
    meta = {"preset": "budget", "model": "m", "data": "d", "widths": [32, 48], "tokens_per_param": [1, 20],
            "seeds": [0, 1, 2], "planned": 40, "finished": 35, "eval_tokens": 100, "device": "cpu"}
    doc = write_budget_results(tmp_path, fake_budget_results(), meta)
    assert (tmp_path / "gap_vs_budget.png").stat().st_size > 1000
    md = (tmp_path / "results.md").read_text()
    assert "| d_model | tokens/param (actual) | tokens | dense loss | kloop4 gap | versatile gap |" in md
    assert ("| 32 | 20 (20.20) | 20,000 | 2.0100 ± 0.0100 (n=3) | +0.0100 ± 0.0000 (n=3) | "
            "-0.0200 ± 0.0200 (n=3) |") in md
    assert "35 of 40 runs finished" in md and "kloop4 at d_model 32: +0.0500" in md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["budget"]["points"] == json.loads(json.dumps(doc["budget"]["points"]))
    assert {p["variant"] for p in saved["budget"]["points"]} == {"dense", "kloop4", "versatile"}
    assert write_budget_results(tmp_path, [], meta)["budget"]["points"] == []  # nothing finished yet
