"""`vffn-supervise` around real `train.py` processes (vffn_jax/cli/supervise.py), and a lost peer
(vffn_jax/parallel/peer_loss.py): `kill -9` of a trainer mid-run, in 1 process and in 2 processes (the other one
and process 0, the coordinator); the survivors exit 75 within the heartbeat bound with one line and no traceback
or native stack on the terminal, every supervisor restarts its own, and the run finishes by itself with exactly
the uninterrupted run's losses. A bad config is not restarted; Ctrl-C on the supervisor saves and stops."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.train.long_run import command, config, env, logged_step, losses, wait_for
from vffn_jax.testing.processes import ROOT, child_env, free_port
from vffn_jax.train import loop as trainer

STOP = 60  # every run here ends at this step (--stop-at keeps LONG's schedule: the cached programs)
OVER = {"run.ckpt_every": 10, "run.eval_every": STOP}  # checkpoints to resume from; a held-out loss at the end
KILL_AT = 15  # a trainer is killed once this step is logged: after checkpoint 10, well before the end
HEARTBEAT_S = 5  # --heartbeat-timeout of the 2-process runs: the bound a silent peer is noticed within
NATIVE_STACK = ("Check failure stack trace", "*** SIGABRT", "    @     0x")


def supervise(trainer_args, log, out_dir: Path, env_vars, *sup_args) -> subprocess.Popen:
    """`vffn-supervise --log LOG ... -- <trainer_args>` with its terminal output (the trainer's too) in files."""
    out, err = (open(out_dir / f"{Path(log).stem}.{name}", "w") for name in ("out", "err"))
    args = [sys.executable, "-m", "vffn_jax.cli.supervise", "--backoff", "1", "--max-restarts", "3", "--log", str(log),
            *sup_args, "--", *map(str, trainer_args)]
    return subprocess.Popen(args, cwd=ROOT, env=env_vars, stdout=out, stderr=err, start_new_session=True)


def events(log) -> list[dict]:
    path = Path(log)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def trainer_pid(log) -> int:
    return [e for e in events(log) if e["event"] == "start"][-1]["pid"]


def finish_all(procs, timeout) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def terminal(out_dir: Path, log) -> str:
    stem = Path(log).stem
    return (out_dir / f"{stem}.out").read_text() + (out_dir / f"{stem}.err").read_text()


# --------------------------------------------------------------------------- one process


def test_a_killed_trainer_is_restarted_and_the_run_ends_exactly(tmp_path):
    trainer.train(config(**OVER), tmp_path / "full", progress=False, stop_at=STOP)  # the uninterrupted reference
    work, log = tmp_path / "run", tmp_path / "sup.jsonl"
    sup = supervise(command(work, "--stop-at", STOP, **OVER), log, tmp_path, env())
    wait_for(logged_step(work, KILL_AT), sup, f"step {KILL_AT}")
    os.kill(trainer_pid(log), signal.SIGKILL)
    assert finish_all([sup], 300) == [0], terminal(tmp_path, log)[-3000:]
    exits = [e for e in events(log) if e["event"] == "exit"]
    assert [e["status"] for e in exits] == [128 + signal.SIGKILL, 0]
    assert exits[0]["meaning"] == "killed by SIGKILL" and exits[0]["next"].startswith("restart 1/3")
    assert exits[0]["checkpoint"] >= 10 and exits[1]["next"] == "stop: not restartable"
    a, b = losses(tmp_path / "full"), losses(work)
    assert sorted(b) == list(range(1, STOP + 1)) and [a[s] for s in a] == [b[s] for s in a]
    ref, got = (trainer_eval(w) for w in (tmp_path / "full", work))
    assert got == ref  # the held-out loss at the end: exactly the uninterrupted run's


def trainer_eval(workdir) -> float:
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["eval/loss"] for r in rows if "eval/loss" in r][-1]


def test_bad_input_is_not_restarted_and_ctrl_c_saves_and_stops(tmp_path):
    log = tmp_path / "bad.jsonl"
    bad = supervise(command(tmp_path / "bad", **{"model.top_k": 99}), log, tmp_path, env())
    assert finish_all([bad], 120) == [2]
    assert [(e["event"], e.get("status")) for e in events(log)] == [("start", None), ("exit", 2)]
    assert "model.top_k=99" in terminal(tmp_path, log) and "stop: not restartable" in terminal(tmp_path, log)

    work, log = tmp_path / "run", tmp_path / "ctrl_c.jsonl"
    sup = supervise(command(work, "--stop-at", STOP, **OVER), log, tmp_path, env())
    wait_for(logged_step(work, 3), sup, "step 3")
    sup.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches the supervisor (the trainer has its own session)
    assert finish_all([sup], 120) == [130], terminal(tmp_path, log)[-3000:]
    (exit_,) = [e for e in events(log) if e["event"] == "exit"]
    assert exit_["status"] == 130 and exit_["next"] == "stop: signalled"
    assert exit_["checkpoint"] == exit_["step"] >= 3  # Ctrl-C saved the step reached, as without a supervisor
    assert "interrupted (Ctrl-C) at step" in terminal(tmp_path, log)


# --------------------------------------------------------------------------- two processes


def two_process_command(work, port: int, i: int) -> list:
    return [*command(work, "--stop-at", STOP, **OVER), "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
            "--process-id", i, "--init-timeout", 120, "--heartbeat-timeout", HEARTBEAT_S]


def run_two(tmp_path: Path, name: str, kill: int | None = None):
    """2 processes of 2 devices, a supervisor each; with `kill`, that process's trainer is killed (-9) once step
    KILL_AT is logged. Returns (workdir, the supervisors' logs, the kill time)."""
    work, port = tmp_path / name, free_port()
    logs = [tmp_path / f"{name}-{i}.jsonl" for i in range(2)]
    sups = [supervise(two_process_command(work, port, i), logs[i], tmp_path, child_env(2)) for i in range(2)]
    killed_at = None
    if kill is not None:
        wait_for(logged_step(work, KILL_AT), sups[0], f"step {KILL_AT}")
        os.kill(trainer_pid(logs[kill]), signal.SIGKILL)
        killed_at = time.time()
    statuses = finish_all(sups, 480)
    assert statuses == [0, 0], "\n----\n".join(terminal(tmp_path, log)[-3000:] for log in logs)
    return work, logs, killed_at


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    work, logs, _ = run_two(tmp, "full")
    assert all([e.get("status") for e in events(log) if e["event"] == "exit"] == [0] for log in logs)
    return work


@pytest.mark.parametrize("kill", [1, 0], ids=["process 1", "process 0, the coordinator"])
def test_a_lost_process_ends_the_other_cleanly_and_the_supervisors_finish_the_run(tmp_path, uninterrupted, kill):
    work, logs, killed_at = run_two(tmp_path, "run", kill=kill)
    survivor = 1 - kill
    first = [[e for e in events(log) if e["event"] == "exit"][0] for log in logs]
    assert first[kill]["status"] == 128 + signal.SIGKILL and first[kill]["next"].startswith("restart")
    assert first[survivor]["status"] == 75 and first[survivor]["next"].startswith("restart")
    assert first[survivor]["unix_time"] - killed_at < HEARTBEAT_S + 10  # the bound, plus a loaded CPU's slack
    said = terminal(tmp_path, logs[survivor])
    lost_line = [line for line in said.splitlines() if line.startswith(f"vffn_jax: process {survivor}: lost")]
    assert lost_line and f"process {kill}" in lost_line[0] and "last committed checkpoint: " in lost_line[0]
    assert "Traceback" not in said and not any(s in said for s in NATIVE_STACK), said[-3000:]
    details = (work / f"peer-lost-{survivor}.txt").read_text()
    assert "Traceback" in details or "coordination" in details
    a, b = losses(uninterrupted), losses(work)
    assert sorted(b) == list(range(1, STOP + 1)) and [a[s] for s in a] == [b[s] for s in a]
    assert trainer_eval(work) == trainer_eval(uninterrupted)  # exactly the uninterrupted run's held-out loss
