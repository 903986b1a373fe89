"""The one-command study (vffn_jax.study): the ordering verdict is computed from numbers, the plan composes
the right configs, the corpus builder, and a micro end-to-end study writes results.md/json and the plots
and skips finished runs when re-run."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from vffn_jax.data import token_cache
from vffn_jax.study.budget import describe_budget_plan, plan_budget, run_budget_study
from vffn_jax.study.corpus import build_stdlib_corpus
from vffn_jax.study.plan import plan
from vffn_jax.study.presets import BUDGET_VARIANTS, PRESETS, VARIANTS
from vffn_jax.study.report import REGIME_TITLES, _trend_sentence, write_budget_results
from vffn_jax.study.runner import run_study
from vffn_jax.study.stats import budget_gaps, budget_trends, ordering_verdict
from vffn_jax.config import ConfigError, DataConfig


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


def test_plan_composes_variants_and_continued_runs(tmp_path):
    runs = plan("354m", tmp_path, seeds=2)
    assert len(runs) == 1 + 2 * len(VARIANTS) * 2
    base = runs[0]
    assert (base.regime, base.variant, base.workdir.name) == ("base", "dense", "dense_base")
    assert base.cfg.scale == "354m" and base.cfg.model.d_model == 1024 and base.cfg.train.steps == 25431
    by = {(r.regime, r.variant, r.seed): r.cfg for r in runs[1:]}
    assert by[("scratch", "kloop2", 0)].model.ffn == "kloop" and by[("scratch", "kloop2", 0)].model.n_loops == 2
    assert by[("scratch", "kloop4", 1)].model.n_loops == 4
    assert by[("scratch", "versatile", 1)].train.seed == 1 and by[("scratch", "versatile", 1)].data.shuffle_seed == 1
    assert by[("scratch", "moe", 0)].train.init_from == ""
    for v in VARIANTS:
        cfg = by[("continued", v, 0)]
        assert cfg.train.init_from == str((tmp_path / "dense_base").resolve())
        assert cfg.train.steps == by[("scratch", v, 0)].train.steps  # same continuation steps for all
        assert cfg.model == by[("scratch", v, 0)].model
    assert not any(r.regime == "base" for r in plan("cpu", tmp_path, regimes=["scratch"], seeds=1))
    with pytest.raises(ConfigError, match="unknown variant"):
        plan("cpu", tmp_path, variants=["nope"])


def test_stdlib_corpus_skips_non_utf8_and_site_packages(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages" / "x").mkdir(parents=True)
    body = "".join(f"line_{i} = {i}\n" for i in range(200))
    (root / "a.py").write_text("import os\n" + body)
    (root / "pkg" / "b.py").write_text("x = 'é'\n" + body)
    (root / "bad.py").write_bytes(b"# -*- coding: latin-1 -*-\ns = '\xe9'\n")
    (root / "empty.py").write_text("")
    (root / "site-packages" / "x" / "c.py").write_text("pass\n")
    (root / "data.txt").write_text("not python\n")
    (root / "pkg" / "long.py").write_text("".join(f"line_{i} = {i}\n" for i in range(400)))
    path, fraction = build_stdlib_corpus(tmp_path / "corpus", root=root, holdout_files=0.34,
                                               eval_chunk_chars=500)
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    files = {d["path"].split("#")[0] for d in docs}
    assert files == {"a.py", "pkg/b.py", "pkg/long.py"}  # no site-packages, no non-UTF-8, no empty file
    manifest = json.loads(path.with_suffix(".manifest.json").read_text())
    assert manifest["skipped_not_utf8"] == ["bad.py"] and manifest["train_files"] == 2
    held_out = manifest["heldout_files"]
    assert len(held_out) == 1 and manifest["holdout_fraction"] == fraction
    # data.py's rule (the last `fraction` of documents) selects exactly the held-out file's pieces
    cfg = DataConfig(path=str(path), holdout_fraction=fraction, cache_dir=str(tmp_path / "cache"))
    val = token_cache.token_split(cfg, "validation")
    train = token_cache.token_split(cfg, "train")
    held_text = (root / held_out[0]).read_text()
    pieces = [d for d in docs if d["path"].split("#")[0] == held_out[0]]
    assert docs[-len(pieces):] == pieces and "".join(
        d["text"] for d in sorted(pieces, key=lambda d: int(d["path"].split("#")[1]))) == held_text
    assert len(val) == len(held_text.encode()) + len(pieces)  # each piece + EOS
    assert len(train) + len(val) == sum(len(d["text"].encode()) + 1 for d in docs)
    assert len(pieces) > 1
    assert build_stdlib_corpus(tmp_path / "corpus", root=root, holdout_files=0.34,
                                     eval_chunk_chars=500) == (path, fraction)  # built once


def test_micro_study_end_to_end(tmp_path):
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


# --------------------------------------------------------------------------- the budget study


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


def _fake_results():
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


def test_budget_gaps_from_fake_numbers():
    rows = {(r["variant"], r["width"], r["tokens_per_param"]): r for r in budget_gaps(_fake_results())}
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


def test_budget_writer_on_fake_results(tmp_path):
    meta = {"preset": "budget", "model": "m", "data": "d", "widths": [32, 48], "tokens_per_param": [1, 20],
            "seeds": [0, 1, 2], "planned": 40, "finished": 35, "eval_tokens": 100, "device": "cpu"}
    doc = write_budget_results(tmp_path, _fake_results(), meta)
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
