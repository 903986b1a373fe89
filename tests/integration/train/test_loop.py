"""Training under real process deaths: SIGKILL during an asynchronous checkpoint save, and SIGTERM (preemption),
each on one real `python train.py` process (tests/integration/train/long_run.py); the reference runs and the
resumes run in-process."""
import os
import signal
import time

import pytest

import train as train_cli
from tests.integration.train.long_run import (STEPS, command, config, finish, losses, logged_step, start,
                                              wait_for)
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.model import placement
from vffn_jax.testing.cli import call
from vffn_jax.train import loop as trainer


def test_kill_during_async_save_keeps_earlier_checkpoints(tmp_path):
    workdir = tmp_path / "killed"
    over = {"run.ckpt_every": 1, "run.keep_ckpts": 50}
    proc = start(command(workdir, **over), tmp_path)
    ckdir = workdir / "checkpoints"
    deadline = time.time() + 240
    try:
        # kill the moment a save is in flight after at least two finished ones
        while time.time() < deadline and proc.poll() is None:
            finished = [p for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.exists() else []
            in_flight = list(ckdir.glob("*tmp*")) if ckdir.exists() else []
            if len(finished) >= 2 and in_flight:
                break
            time.sleep(0.005)
        else:
            pytest.fail(f"no checkpoint save observed in time (rc={proc.poll()})")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        finish(proc, tmp_path, timeout=30)
    steps = ckpt.all_steps(workdir)
    assert len(steps) >= 2
    s = placement.setup(config(**over))
    for step in steps:  # every checkpoint that counts as a step restores
        ckpt.restore(ckpt.make_manager(workdir, read_only=True), step,
                     ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings))
    # re-running the same command resumes from the last complete step (stopped 2 steps later to keep it short)
    resume = call(train_cli.main, *command(workdir, "--stop-at", steps[-1] + 2, **over)[2:])
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert f"steps {steps[-1]}->{STEPS}" in resume.stdout
    assert ckpt.latest_step(workdir) == steps[-1] + 2


def test_sigterm_saves_the_step_reached_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    """Preempted (SIGTERM) after step 3 and re-run, up to step 60: the uninterrupted run's losses exactly."""
    stop = 60
    # the uninterrupted reference first, in-process: its compiled step serves the process below from the cache
    trainer.train(config(), tmp_path / "full", progress=False, stop_at=stop)
    args = command(tmp_path / "preempted", "--stop-at", stop)
    proc = start(args, tmp_path)
    try:
        wait_for(logged_step(tmp_path / "preempted", 3), proc, "step 3")
        proc.send_signal(signal.SIGTERM)
    finally:
        out, err = finish(proc, tmp_path, timeout=120)
    assert proc.returncode == 75, err[-3000:]
    (saved,) = ckpt.all_steps(tmp_path / "preempted")
    assert 3 <= saved < stop
    assert f"preempted: stopped at step {saved} after saving it" in err and "re-run the same command" in err
    assert max(losses(tmp_path / "preempted")) == saved  # metrics up to the saved step were flushed

    again = call(train_cli.main, *args[2:])  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"steps {saved}->{STEPS}" in again.stdout
    a, b = losses(tmp_path / "full"), losses(tmp_path / "preempted")
    assert sorted(a) == sorted(b) == list(range(1, stop + 1))
    assert [a[s] for s in a] == [b[s] for s in a], "preempted + resumed must reproduce the uninterrupted losses"
