"""Continued pretraining (`--init-from`): shared weights copied from a dense run, new ones fresh, optimizer and
step reset, shape mismatches refused; the new variants (moe, versatile_avg) train from it via train.py.
One dense run at the shared tiny shape (checkpoints at steps 2 and 4) is trained once per module."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import train as train_cli
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.config import ConfigError
from vffn_jax.data import batches as data_lib
from vffn_jax.model import placement
from vffn_jax.testing.shapes import tiny_args, tiny_config
from vffn_jax.train import init_from
from vffn_jax.train import loop as trainer
from vffn_jax.train import optimizer
from vffn_jax.evals import step as eval_step_lib


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("init_from") / "dense"
    summary = trainer.train(tiny_config("dense"), workdir, progress=False)
    return workdir, summary


def initialised(variant, source, **extra):
    cfg = tiny_config(variant, extra)
    s = placement.setup(cfg)
    tx = optimizer.make_optimizer(cfg.train)
    _, opt_shardings = optimizer.opt_state_shardings(tx, s)
    params, opt_state, info = init_from.init_from_checkpoint(s, tx, opt_shardings, source)
    return cfg, s, params, opt_state, info


def flat(params):
    return {placement.param_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_one_loop_from_dense_has_the_dense_held_out_loss_at_step_0(dense_run):
    workdir, summary = dense_run
    cfg, s, params, _, info = initialised("kloop", workdir, **{"model.n_loops": 1})
    assert info["init_from_step"] == 4 and info["init_fresh"] == [] and info["init_dropped"] == []
    eval_step = eval_step_lib.make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)
    batches = data_lib.eval_batches(cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                                    n_batches=cfg.run.eval_batches)
    result = eval_step_lib.evaluate(eval_step, params, batches, s.mesh)
    assert result["loss"] == summary["eval"]["loss"]  # the dense run's final eval, on the params saved at step 4


def test_versatile_from_dense_copies_shared_weights_and_inits_routers_fresh(dense_run):
    workdir, _ = dense_run
    # a resharding restore: the dense run used 8-way data parallelism, this mesh is (2, 2, 2)
    cfg, s, params, opt_state, info = initialised(
        "versatile", workdir / "checkpoints", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    src = flat(ckpt.restore(ckpt.make_manager(workdir, read_only=True), 4,
                            ckpt.abstract_with_shardings(*_abstract_dense()))[0])
    got = flat(params)
    assert set(info["init_fresh"]) == {"layers/ffn/expert_router", "layers/ffn/depth_router"}
    assert set(info["init_copied"]) == set(src) and len(src) == len(got) - 2
    for name, value in src.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    _, fresh, _ = placement.init_params(cfg.model, s.mesh, cfg.train.seed)  # the model's own initialiser
    fresh = flat(fresh)
    for name in info["init_fresh"]:
        np.testing.assert_array_equal(got[name], fresh[name])
        assert 0.015 < got[name].std() < 0.025  # normal(0, 0.02) truncated
    assert all(float(np.abs(np.asarray(x)).sum()) == 0 for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0)


def _abstract_dense():
    s = placement.setup(tiny_config("dense"))
    return s.abstract_params, s.param_shardings


def test_mismatched_source_names_the_field(dense_run, capsys):
    workdir, _ = dense_run
    with pytest.raises(ConfigError, match=r"model\.d_model differs \(source 64, this run 32\).*model\.d_model=64"):
        initialised("versatile", workdir, **{"model.d_model": 32})
    args = [*tiny_args({"model.n_layers": 3}), "--variant", "moe", "--workdir", str(workdir.parent / "bad"),
            "--no-progress", "--init-from", str(workdir)]
    assert train_cli.main(args) == 2
    assert "model.n_layers differs" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"train\.init_step=3 is not a checkpoint .*available steps: \[2, 4\]"):
        init_from.resolve_init_source(workdir, 3)


@pytest.mark.slow  # two variants' train, eval and init programs: ~35 s cold
@pytest.mark.parametrize("variant", ["moe", "versatile_avg"])
def test_new_variants_train_from_dense_via_cli(dense_run, variant, capsys):
    """versatile_avg trains all 4 steps (its final eval is checked); moe stops at step 2 and is resumed."""
    source, _ = dense_run
    workdir = source.parent / variant
    args = [*tiny_args(), "--variant", variant, "--workdir", str(workdir), "--no-progress", "--init-from", str(source)]
    first = ["--stop-at", "2"] if variant == "moe" else []  # --stop-at keeps train.steps' schedule (one program)
    assert train_cli.main(args + first) == 0
    out = capsys.readouterr().out
    assert f"initialised from {source} step 4" in out and "steps 0->4" in out
    assert json.loads((workdir / "config.json").read_text())["train"]["init_from"] == str(source)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["init_from"] == str(source) and rows[0]["init_from_step"] == 4
    trained = [r for r in rows if "loss" in r]
    assert [r["step"] for r in trained] == ([1, 2] if first else [1, 2, 3, 4])
    assert all(np.isfinite(r["loss"]) for r in trained)
    assert {"balance_loss", "router_entropy", "expert_load_cv"} <= set(trained[0])
    if variant == "versatile_avg":
        assert trained[0]["mean_alpha"] == 0.5 and "depth_hist" in trained[0]
        assert rows[-1]["eval/mean_alpha"] == 0.5 and "eval/depth_hist" in rows[-1]
        return
    # re-running the same command (here to step 3: no final eval to compile) resumes and ignores --init-from
    assert train_cli.main(args + ["--stop-at", "3"]) == 0
    out = capsys.readouterr().out
    assert "init_from ignored" in out and "steps 2->4" in out and "initialised from" not in out
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1] == 3
