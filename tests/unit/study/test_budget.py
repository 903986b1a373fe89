"""The budget study (vffn_jax/study/budget.py): its grid and tokens per parameter, and a resumed study that
reports the runs that finished."""
from __future__ import annotations

import json
import re

import pytest

from vffn_jax.config import ConfigError
from vffn_jax.study.budget import describe_budget_plan, plan_budget, run_budget_study
from vffn_jax.study.corpus import build_stdlib_corpus
from vffn_jax.study.plan import plan
from vffn_jax.study.presets import BUDGET_VARIANTS, PRESETS


def test_budget_plan_grid_and_tokens_per_param(tmp_path):
    from vffn_jax.perf import flops

    grid = PRESETS["budget"].grid
    runs = plan_budget("budget", tmp_path)
    assert len(runs) == len(grid.widths) * len(grid.tokens_per_param) * len(BUDGET_VARIANTS) * grid.seeds
    assert {r.regime for r in runs} == {"budget"} and not any(r.cfg.train.init_from for r in runs)
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)  # seed-major: whole seeds of the grid first
    by = {(r.width, r.tpp, r.variant, r.seed): r for r in runs}
    assert len(by) == len(runs)
    for (w, tpp, v, seed), r in by.items():
        m, t = r.cfg.model, r.cfg.train
        assert (m.d_model, m.d_ff, m.n_heads) == (w, 4 * w, w // 16)
        dense_params = flops.analytic_params(by[(w, tpp, "dense", seed)].cfg.model)
        assert t.steps == max(1, round(tpp * dense_params / (t.batch_size * t.seq_len)))  # equal tokens per point
        assert abs(t.steps * t.batch_size * t.seq_len / dense_params - tpp) / tpp < 0.02
        assert (t.seed, r.cfg.data.shuffle_seed) == (seed, seed)
        assert r.workdir == tmp_path.resolve() / "budget" / f"d{w}" / f"tpp{tpp:g}" / v / f"seed{seed}"
        assert r.cfg.run.eval_every == 0 and r.cfg.run.ckpt_every == t.steps
    assert by[(32, 20, "kloop4", 2)].cfg.model.n_loops == 4 and by[(48, 1, "versatile", 0)].cfg.model.ffn == "versatile"
    assert by[(32, 20, "width_shared", 0)].cfg.model.ffn == "width_shared"
    assert len(plan_budget("budget", tmp_path, seeds=1, variants=["dense", "versatile"])) == 2 * 4 * 2
    with pytest.raises(ConfigError, match="needs dense"):
        plan_budget("budget", tmp_path, variants=["versatile"])
    with pytest.raises(ConfigError, match="budget study"):
        plan("budget", tmp_path)
    lines = describe_budget_plan("budget", runs)
    assert len(lines) == 2 + len(grid.widths) * len(grid.tokens_per_param) + 3
    hours = float(re.search(r"= ([\d.]+) h in all", "\n".join(lines)).group(1))
    assert 2.0 < hours < 4.0  # the preset is sized for ~3 hours on the project's 2-core CPU


def _fake_finish(spec, loss):
    """What is_finished and collect read: config.json, the final held-out loss, a checkpoint at `steps`."""
    wd = spec.workdir
    (wd / "checkpoints" / str(spec.cfg.train.steps)).mkdir(parents=True)
    (wd / "config.json").write_text(spec.cfg.to_json())
    n = spec.cfg.train.steps
    rows = [{"step": n, "loss": loss + 0.1, "tokens_per_sec": 1000.0},
            {"step": n, "eval/loss": loss, "eval/perplexity": 2.718 ** loss}]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_budget_resume_marks_finished_runs_and_reports_them(tmp_path):
    logs = []
    doc = run_budget_study("budget-micro", tmp_path, dry_run=True, log=logs.append)
    assert len(doc["runs"]) == 2 * 2 * 5 * 2 and not any(r["finished"] for r in doc["runs"])
    assert "some widths have no stated throughput" in "\n".join(logs)
    specs = plan_budget("budget-micro", tmp_path, corpus=build_stdlib_corpus(
        tmp_path / "corpus", 40, holdout_files=0.1))
    first = [s for s in specs if (s.width, s.tpp) == (16, 0.02) and s.variant in ("dense", "versatile")]
    for i, s in enumerate(first):
        _fake_finish(s, 2.0 + 0.1 * (s.variant == "versatile") + 0.01 * s.seed)
    again = run_budget_study("budget-micro", tmp_path, dry_run=True, log=logs.append)
    done = {(r["variant"], r["seed"]) for r in again["runs"] if r["finished"]}
    assert done == {("dense", 0), ("dense", 1), ("versatile", 0), ("versatile", 1)}
    assert all(r["width"] == 16 and r["tokens_per_param"] == 0.02 for r in again["runs"] if r["finished"])
    assert "(4 finished)" in "\n".join(logs)
    rep = run_budget_study("budget-micro", tmp_path, report_only=True, log=logs.append)
    (pt,) = [p for p in rep["budget"]["points"] if p["variant"] == "versatile"]
    assert pt["n"] == 2 and pt["gap_mean"] == pytest.approx(0.1) and pt["gap_std"] == pytest.approx(0.0, abs=1e-9)
    assert (tmp_path / "gap_vs_budget.png").stat().st_size > 0
    assert "| 16 | 0.02 (" in (tmp_path / "results.md").read_text()
    # a changed config under a finished run is refused, not silently reused
    with pytest.raises(ConfigError, match="different config"):
        run_budget_study("budget-micro", tmp_path, dry_run=True, overrides={"train.lr": 0.01}, log=logs.append)
