"""The real `python train.py` process of the training integration tests (signals, kills, hangs), and helpers to
start, watch and stop it.

Every process here runs one program: the shared tiny shape (`testing.shapes.TINY_TRAIN`) with LONG's step count
(the learning-rate schedule is part of the compiled step) on as many devices as the test process, so the
persistent compile cache serves every launch after the first, and an in-process `train()` of the same config
(a reference run, a resume) reuses it too. A test that ends earlier than train.steps says so with --stop-at,
which keeps the schedule.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from vffn_jax.testing.processes import ROOT, child_env
from vffn_jax.testing.shapes import tiny_args, tiny_config

STEPS = 400  # longer than any of these tests lets a process run
LONG = {"train.steps": STEPS, "run.ckpt_every": 1000}  # periodic saves far away unless a test asks for them


def config(**over):
    """The in-process config of `command(..., **over)`."""
    return tiny_config(overrides={**LONG, **over})


def command(workdir, *extra, **over) -> list[str]:
    return [sys.executable, "train.py", *tiny_args({**LONG, **over}), "--workdir", str(workdir), "--no-progress",
            *map(str, extra)]


def env(**extra) -> dict[str, str]:
    return child_env(jax.device_count(), **extra)  # the test process's device count: the same compiled programs


def start(args, tmp_path, env_vars=None) -> subprocess.Popen:
    """The process, with stdout/stderr in files: a stopped data worker may hold pipes open after its parent exits.
    It takes SIGINT as a terminal's Ctrl-C does even when these tests run where SIGINT is ignored (`nohup`,
    `cmd &` in a script), which a child would otherwise inherit."""
    out, err = (open(tmp_path / name, "w") for name in ("stdout.txt", "stderr.txt"))
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # inherited through exec; a handler is not
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, cwd=ROOT, env=env_vars or env(), stdout=out, stderr=err, start_new_session=True)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def finish(proc, tmp_path, timeout=60) -> tuple[str, str]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()


def wait_for(condition, proc, what, timeout=180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"{what} never happened (rc={proc.poll()})")


def logged_step(workdir, step):
    """A condition: metrics.jsonl has a training row at `step` or later."""
    path = Path(workdir) / "metrics.jsonl"

    def reached() -> bool:
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                row = json.loads(line)
            except ValueError:  # a line being written
                continue
            if row.get("step", 0) >= step and "loss" in row:
                return True
        return False

    return reached


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
