"""The run directory: one object owns the layout; its errors name the path and the fix."""
import json

import pytest

from vffn_jax.config import ConfigError, load_config
from vffn_jax.rundir import RunDir


def _cfg(**overrides):
    return load_config("tiny", "versatile", overrides)


def test_prepare_writes_the_resolved_config_and_refuses_another_model(tmp_path):
    run = RunDir.at(tmp_path / "run").prepare(_cfg(), is_main=True)
    assert run.read_config() == _cfg()
    assert json.loads(run.config_path.read_text())["model"]["ffn"] == "versatile"
    RunDir.at(tmp_path / "run").prepare(_cfg(**{"train.steps": 7}), is_main=True)  # same model: a resume
    assert run.read_config().train.steps == 7
    with pytest.raises(ConfigError, match=r"different model .*d_model.*new --workdir"):
        RunDir.at(tmp_path / "run").prepare(_cfg(**{"model.d_model": 64}), is_main=True)


def test_prepare_on_a_follower_process_writes_nothing(tmp_path):
    run = RunDir.at(tmp_path / "run").prepare(_cfg(), is_main=False)
    assert run.path.exists() and not run.has_config()


def test_config_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; create it by training.*train\.py"):
        RunDir.at(tmp_path / "missing").read_config()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found: .* not a training run directory"):
        RunDir.at(tmp_path / "empty").read_config()
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        RunDir.at(tmp_path / "empty").read_config()


def test_metrics_rows_and_the_final_eval(tmp_path):
    run = RunDir.at(tmp_path)
    assert run.metrics() == [] and run.final_eval(2) is None
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval/loss": 2.7},
            {"step": 2, "eval/loss": 2.6}]
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert run.metrics() == rows
    assert run.final_eval(2) == {"step": 2, "eval/loss": 2.6}  # the last one logged at that step
    assert run.final_eval(1) is None


def test_layout_is_the_documented_one(tmp_path):
    run = RunDir.at(str(tmp_path))
    assert RunDir.at(run) is run
    names = [p.name for p in (run.config_path, run.checkpoints, run.metrics_path, run.tensorboard, run.compile_cache,
                              run.depth_plot)]
    assert names == ["config.json", "checkpoints", "metrics.jsonl", "tb", "compile_cache", "depth_per_layer.png"]


def test_committed_steps_are_the_bare_numbered_folders(tmp_path):
    """A save in flight (Orbax's temporary folder) is not committed; listing needs no Orbax."""
    from vffn_jax.rundir import RunDir

    assert RunDir.at(tmp_path).committed_steps() == []
    for name in ("10", "20", "30.orbax-checkpoint-tmp-1733", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert RunDir.at(tmp_path).committed_steps() == [10, 20]
