"""The study's plan (vffn_jax/study/plan.py): the configs of every run, and each regime's data order."""
from __future__ import annotations

import pytest

from vffn_jax.config import ConfigError
from vffn_jax.study.plan import plan
from vffn_jax.study.presets import VARIANTS, continued_shuffle_seed


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


def test_continued_runs_have_their_own_data_order(tmp_path):
    runs = plan("354m", tmp_path, seeds=3)
    base = runs[0]
    assert base.regime == "base" and base.cfg.data.shuffle_seed == 0
    scratch = {r.seed: r.cfg.data.shuffle_seed for r in runs if r.regime == "scratch" and r.variant == "dense"}
    cont = {r.seed: r.cfg.data.shuffle_seed for r in runs if r.regime == "continued" and r.variant == "dense"}
    assert scratch == {0: 0, 1: 1, 2: 2}
    assert len(set(cont.values())) == 3 and not set(cont.values()) & {0, 1, 2}
    assert cont == {k: continued_shuffle_seed(k) for k in range(3)}
    assert all(r.cfg.data.shuffle_seed == cont[r.seed] for r in runs if r.regime == "continued")
    assert "width_shared" in VARIANTS
