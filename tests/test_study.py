"""The one-command study (vffn_jax.study): the ordering verdict is computed from numbers, the plan composes
the right configs, the corpus builder, and a micro end-to-end study writes results.md/json and the plots
and skips finished runs when re-run."""
from __future__ import annotations

import json
import re

import pytest

from vffn_jax import data as data_lib
from vffn_jax import study
from vffn_jax.config import ConfigError, DataConfig


def test_ordering_held_from_numbers():
    losses = {"versatile": [2.00, 2.01, 2.02], "depth_only": [2.05, 2.06, 2.04], "width_shared": [2.07, 2.08, 2.06],
              "dense": [2.10, 2.12, 2.11], "moe": [1.0]}
    v = study.ordering_verdict(losses)
    assert v["held"] is True
    assert v["seeds_all_held"] == 3 and v["seeds_compared"] == 3
    assert "held on mean held-out loss" in v["sentence"] and "NOT" not in v["sentence"]
    assert "versatile 2.0100 ± 0.0100" in v["sentence"]  # mean ± sample std, from the numbers
    assert [c["held"] for c in v["comparisons"]] == [True] * 4


def test_ordering_not_held_names_the_failed_comparison():
    losses = {"versatile": [2.00, 2.02], "depth_only": [2.05, 2.06], "width_shared": [2.15, 2.13],
              "dense": [2.10, 2.12]}
    v = study.ordering_verdict(losses)
    assert v["held"] is False
    assert "did NOT hold" in v["sentence"]
    assert "width_shared (2.1400) is not below dense (2.1100" in v["sentence"]
    failed = [c for c in v["comparisons"] if not c["held"]]
    assert [(c["better"], c["worse"]) for c in failed] == [("width_shared", "dense")]


def test_ordering_within_spread_and_per_seed_count():
    # means in order but seed 1 reverses versatile vs depth_only: held on means, 1 of 2 seeds
    losses = {"versatile": [2.00, 2.10], "depth_only": [2.08, 2.04], "width_shared": [2.09, 2.09],
              "dense": [2.20, 2.20]}
    v = study.ordering_verdict(losses)
    assert v["held"] is True and v["seeds_all_held"] == 1
    assert "1 of 2 seed(s)" in v["sentence"] and "within the seed spread" in v["sentence"]


def test_ordering_missing_variant():
    v = study.ordering_verdict({"versatile": [1.0], "dense": [2.0]})
    assert v["held"] is None and "cannot be checked" in v["sentence"]
    assert set(v["missing"]) == {"depth_only", "width_shared"}


def test_plan_composes_variants_and_continued_runs(tmp_path):
    runs = study.plan("354m", tmp_path, seeds=2)
    assert len(runs) == 1 + 2 * len(study.VARIANTS) * 2
    base = runs[0]
    assert (base.regime, base.variant, base.workdir.name) == ("base", "dense", "dense_base")
    assert base.cfg.scale == "354m" and base.cfg.model.d_model == 1024 and base.cfg.train.steps == 25431
    by = {(r.regime, r.variant, r.seed): r.cfg for r in runs[1:]}
    assert by[("scratch", "kloop2", 0)].model.ffn == "kloop" and by[("scratch", "kloop2", 0)].model.n_loops == 2
    assert by[("scratch", "kloop4", 1)].model.n_loops == 4
    assert by[("scratch", "versatile", 1)].train.seed == 1 and by[("scratch", "versatile", 1)].data.shuffle_seed == 1
    assert by[("scratch", "moe", 0)].train.init_from == ""
    for v in study.VARIANTS:
        cfg = by[("continued", v, 0)]
        assert cfg.train.init_from == str((tmp_path / "dense_base").resolve())
        assert cfg.train.steps == by[("scratch", v, 0)].train.steps  # same continuation steps for all
        assert cfg.model == by[("scratch", v, 0)].model
    assert not any(r.regime == "base" for r in study.plan("cpu", tmp_path, regimes=["scratch"], seeds=1))
    with pytest.raises(ConfigError, match="unknown variant"):
        study.plan("cpu", tmp_path, variants=["nope"])


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
    path, fraction = study.build_stdlib_corpus(tmp_path / "corpus", root=root, holdout_files=0.34,
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
    val = data_lib.token_split(cfg, "validation")
    train = data_lib.token_split(cfg, "train")
    held_text = (root / held_out[0]).read_text()
    pieces = [d for d in docs if d["path"].split("#")[0] == held_out[0]]
    assert docs[-len(pieces):] == pieces and "".join(
        d["text"] for d in sorted(pieces, key=lambda d: int(d["path"].split("#")[1]))) == held_text
    assert len(val) == len(held_text.encode()) + len(pieces)  # each piece + EOS
    assert len(train) + len(val) == sum(len(d["text"].encode()) + 1 for d in docs)
    assert len(pieces) > 1
    assert study.build_stdlib_corpus(tmp_path / "corpus", root=root, holdout_files=0.34,
                                     eval_chunk_chars=500) == (path, fraction)  # built once


def test_micro_study_end_to_end(tmp_path):
    logs = []
    doc = study.run_study("micro", tmp_path, seeds=1, variants=["dense", "versatile"], log=logs.append)
    for name in ("results.md", "results.json", "loss_curves.png", "loops_per_layer.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "results.md").read_text()
    for regime in ("scratch", "continued"):
        table = md.split(study.REGIME_TITLES[regime])[1].split("**Ordering.**")[0]
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
    again = study.run_study("micro", tmp_path, seeds=1, variants=["dense", "versatile"], log=logs.append)
    assert sum("finished, reusing" in line for line in logs) == 5
    assert not any("trained in" in line for line in logs)
    assert again["regimes"]["scratch"]["dense"]["loss_mean"] == doc["regimes"]["scratch"]["dense"]["loss_mean"]
