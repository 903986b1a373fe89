"""checkpoint/restore.py, evals/heldout.py and eval.py: params-only restore, equality with training's logged eval, device independence,
the JSON CLI, the depth plot, and the error messages. They read the session's `tiny_run` (the shared tiny shape,
trained once per session; copied wherever a test changes it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from vffn_jax.checkpoint import restore
from vffn_jax.evals import heldout
from vffn_jax.model import placement
from vffn_jax.checkpoint.manager import CheckpointMismatchError
from vffn_jax.testing import cli
from vffn_jax.testing.shapes import tiny_config


@pytest.fixture(scope="module")
def run(tiny_run):
    """The session's tiny run (checkpoints at 2 and 4). Read-only."""
    return tiny_run


@pytest.fixture(scope="module")
def result(run, tmp_path_factory):
    """Eval on all 8 devices of a copy whose latest checkpoint has *only* params (no opt_state, no data):
    restoring anything else would fail."""
    copy = tmp_path_factory.mktemp("params_only") / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tb"))
    for item in ("opt_state", "data"):
        shutil.rmtree(copy / "checkpoints" / "4" / item)
    return heldout.evaluate_run(copy)


def _logged_eval(workdir: Path) -> dict:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval/loss" in r][-1]


def test_params_only_restore_matches_training_eval(run, result):
    logged = _logged_eval(run)
    assert result["step"] == logged["step"] == 4
    assert abs(result["loss"] - logged["eval/loss"]) < 1e-5
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert result["mean_depth"] == pytest.approx(logged["eval/mean_depth"], abs=1e-6)
    assert result["notes"] == []
    assert result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}


def test_statistics_are_consistent(result):
    hist = np.asarray(result["depth_hist"])
    assert hist.shape == (2, 4)
    np.testing.assert_allclose(hist.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(result["mean_depth_per_layer"], hist @ np.arange(1, 5), atol=1e-9)
    assert 1.0 <= result["mean_depth"] <= 4.0
    assert result["mean_depth"] == pytest.approx(np.mean(result["mean_depth_per_layer"]), abs=1e-6)
    assert result["mean_alpha"] == pytest.approx((4 - result["mean_depth"]) / 4, abs=1e-6)  # alpha = (L - depth)/L
    load = np.asarray(result["expert_load_per_layer"])
    assert load.shape == (2, 8)
    np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(result["expert_load"], load.mean(0), atol=1e-9)
    assert result["expert_load_max_over_mean"] >= 1.0 and result["expert_load_cv"] >= 0.0
    assert 0.0 < result["router_entropy"] <= np.log(8) + 1e-6
    assert result["params_non_embedding"] < result["params_total"]
    cfg = tiny_config("versatile").model
    from vffn_jax.perf import flops

    assert result["params_total"] == flops.analytic_params(cfg)
    assert result["flops_per_token_inference"] == pytest.approx(
        flops.flops_per_token(cfg, 32, train=False, mean_depth=result["mean_depth"]))
    assert result["flops_per_token_train"] == flops.flops_per_token(cfg, 32, train=True)


def test_single_device_equals_eight(run, result):
    one = heldout.evaluate_run(run, devices=jax.devices()[:1], plot=False)
    assert one["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert one["loss"] == pytest.approx(result["loss"], abs=1e-5)
    for key in ("depth_hist", "expert_load_per_layer"):  # discrete routing decisions: identical up to float ties
        np.testing.assert_allclose(one[key], result[key], atol=1e-6)
    assert one["router_entropy"] == pytest.approx(result["router_entropy"], abs=1e-5)


def test_cli_json_and_plot(run, result, tmp_path):
    """`eval.py --json` (in-process) prints every statistic and writes the depth plot into the workdir."""
    import eval as eval_cli

    copy = tmp_path / "run"  # eval.py writes depth_per_layer.png into the run: a copy of the shared one
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tb"))
    proc = cli.call(eval_cli.main, "--workdir", copy, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("step", "loss", "perplexity", "depth_hist", "mean_depth", "mean_depth_per_layer", "mean_alpha",
                "expert_load", "expert_load_per_layer", "expert_load_max_over_mean", "expert_load_cv",
                "router_entropy", "params_total", "params_non_embedding", "flops_per_token_train",
                "flops_per_token_inference", "depth_plot"):
        assert key in out, key
    assert out["loss"] == pytest.approx(result["loss"], abs=1e-5)
    png = Path(out["depth_plot"])
    assert png == copy / "depth_per_layer.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).ndim == 3


def test_text_report(result):
    import eval as eval_cli

    text = eval_cli.format_report(result)
    for needle in ("held-out loss", "perplexity", "mean alpha", "router entropy", "FLOPs/token inference", "layer"):
        assert needle in text


def test_missing_paths(tmp_path, capsys):
    import eval as eval_cli

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        heldout.evaluate_run(missing)
    assert eval_cli.main(["--workdir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "train.py" in err and "Traceback" not in err

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        heldout.evaluate_run(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(tiny_config("versatile").to_json())
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        heldout.evaluate_run(tmp_path / "empty")


def test_unknown_step_lists_available(run, capsys):
    import eval as eval_cli

    with pytest.raises(restore.StepNotFoundError, match=r"available steps: \[2, 4\]"):
        heldout.evaluate_run(run, step=3)
    assert eval_cli.main(["--workdir", str(run), "--step", "3"]) == 2
    assert "available steps: [2, 4]" in capsys.readouterr().err


def test_config_checkpoint_mismatch(run, tmp_path, capsys):
    import eval as eval_cli

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("tb"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model"]["d_model"] = 128
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"parameter '[\w/]+'"):
        heldout.evaluate_run(copy, plot=False)
    assert eval_cli.main(["--workdir", str(copy), "--no-plot"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "parameter" in err and "Traceback" not in err


def test_dense_has_no_depth_keys(tmp_path):
    """A dense checkpoint (initial weights, saved directly): no depth/expert keys, the plot is skipped."""
    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.perf import flops

    cfg = tiny_config("dense")
    workdir = tmp_path / "dense"
    workdir.mkdir()
    (workdir / "config.json").write_text(cfg.to_json())
    s = placement.setup(cfg, jax.devices()[:1])
    _, params, _ = placement.init_params(cfg.model, s.mesh, cfg.train.seed)
    manager = ckpt.make_manager(workdir, cfg.run)
    ckpt.save(manager, 1, params, {"count": np.zeros((), np.int32)}, force=True)  # eval never reads it
    manager.wait_until_finished()

    out = heldout.evaluate_run(workdir, devices=jax.devices()[:1], n_batches=1)
    assert out["ffn"] == "dense" and out["eval_batches"] == 1 and out["step"] == 1
    assert np.log(256) - 1 < out["loss"] < np.log(384) + 1  # near-uniform predictions at init
    for key in ("depth_hist", "mean_depth", "mean_alpha", "expert_load", "router_entropy", "inference_flops_depth"):
        assert key not in out, key
    assert out["depth_plot"] is None and "no depth router" in out["depth_plot_note"]
    assert not (workdir / heldout.PLOT_NAME).exists()
    assert out["flops_per_token_inference"] == flops.flops_per_token(cfg.model, 32, train=False)
    import eval as eval_cli

    text = eval_cli.format_report(out)
    assert "loops per token" not in text and "expert load" not in text and "no depth router" in text


def test_export_is_a_params_only_run_that_eval_restores(run, result, tmp_path):
    from vffn_jax.checkpoint import export

    info = export.export(run, tmp_path / "f32")
    assert info["step"] == 4 and info["param_dtype"] == "float32"
    step_dir = tmp_path / "f32" / "checkpoints" / "4"
    assert (step_dir / "params").is_dir() and not (step_dir / "opt_state").exists() and not (step_dir / "data").exists()
    assert list(step_dir.glob("vffn_checksums.*.json"))  # verified on restore like any checkpoint
    reference = result  # the run's step 4 on the same 8 devices (eval restores params only)
    assert heldout.evaluate_run(tmp_path / "f32", plot=False)["loss"] == reference["loss"]

    half = export.export(run, tmp_path / "bf16", dtype="bfloat16")
    assert half["param_bytes"] * 2 == info["param_bytes"]
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved["model"]["param_dtype"] == "bfloat16"
    assert abs(heldout.evaluate_run(tmp_path / "bf16", plot=False)["loss"] - reference["loss"]) < 0.02
    from vffn_jax.cli import export as export_cli

    assert export_cli.main(["--workdir", str(run), "--out", str(tmp_path / "f32")]) == 2  # not an empty folder
