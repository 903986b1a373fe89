"""Ctrl-C and the hang watchdog (vffn_jax/train/watchdog.py), on the real command line: real signals to real
`python train.py` processes (tests/integration/train/long_run.py), real hangs (a storage server that never
answers, a data worker that stops), nothing of the code under test replaced."""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.integration.train.long_run import STEPS, command, env, finish, logged_step, start, wait_for
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.errors import EXIT_HUNG, EXIT_INTERRUPTED


def sigint_taken(pid) -> bool:
    """No SIGINT pending for `pid` (Linux /proc): its handler has taken the last one sent."""
    rows = Path(f"/proc/{pid}/status").read_text().splitlines()
    pending = [int(row.split()[1], 16) for row in rows if row.startswith(("SigPnd:", "ShdPnd:"))]
    return len(pending) == 2 and not any(mask & (1 << (signal.SIGINT - 1)) for mask in pending)


def test_ctrl_c_saves_the_step_reached_the_same_command_resumes_and_a_second_ctrl_c_stops_at_once(tmp_path):
    workdir = tmp_path / "run"
    args = command(workdir)
    proc = start(args, tmp_path)
    wait_for(logged_step(workdir, 3), proc, "step 3")
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc, tmp_path)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    (saved,) = ckpt.all_steps(workdir)
    assert 3 <= saved < STEPS
    line = (f"vffn_jax: interrupted (Ctrl-C) at step {saved}: saved checkpoint {saved} in {workdir / 'checkpoints'}; "
            "re-run the same command to resume")
    assert line in err.splitlines() and (out + err).count("interrupted") == 1
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert max(json.loads(row)["step"] for row in (workdir / "metrics.jsonl").read_text().splitlines()) == saved

    # The same command resumes from that step; two Ctrl-C then stop it at once: no save, no traceback, and the
    # committed checkpoint is untouched.
    proc = start(args, tmp_path)
    wait_for(logged_step(workdir, saved + 2), proc, f"step {saved + 2}")
    proc.send_signal(signal.SIGINT)
    # a second SIGINT sent while the first is still pending would merge with it (signals are not queued)
    wait_for(lambda: sigint_taken(proc.pid), proc, "the first SIGINT's delivery", timeout=10)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    out, err = finish(proc, tmp_path, timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert time.time() - sent < 5
    assert f"steps {saved}->{STEPS}" in out
    assert "interrupted again (Ctrl-C): stopped without saving" in err and "saved checkpoint" not in err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert ckpt.all_steps(workdir) == [saved]
    assert ckpt.verify_step(workdir / "checkpoints", saved).status == "verified"


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path):
    workdir = tmp_path / "run"
    proc = start(command(workdir), tmp_path)
    wait_for(lambda: (workdir / "config.json").exists(), proc, "start-up")  # train() has begun; no step yet
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc, tmp_path, timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "interrupted (Ctrl-C) before training started: nothing saved" in err
    assert "Traceback" not in out + err and not (workdir / "metrics.jsonl").exists()


def assert_hang_report(workdir, err, where, blocked_frame):
    report = (workdir / "hang-0.txt").read_text()
    header = report.splitlines()[0]
    assert header.startswith("vffn_jax: hang: no training step finished for") and where in header
    assert f"exiting with status {EXIT_HUNG}" in header and header in err
    assert report.count("Thread 0x") + report.count("Current thread 0x") >= 2  # all threads, not only one
    assert blocked_frame in report and blocked_frame in err  # the stacks went to the log too


def test_watchdog_dumps_stacks_and_exits_when_the_storage_server_never_answers(tmp_path):
    # A gs:// data source whose server accepts connections and never replies: start-up blocks in the listing.
    # The clock starts with train(), so start-up counts.
    server = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    stuck = env(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="t")
    workdir = tmp_path / "run"
    with server:
        proc = start(command(workdir, **{"data.path": "gs://stuck/corpus.jsonl", "run.hang_minutes": 0.05}),
                     tmp_path, env_vars=stuck)
        out, err = finish(proc, tmp_path)
    assert proc.returncode == EXIT_HUNG, err[-3000:]
    assert_hang_report(workdir, err, "during start-up (no step yet)", "vffn_jax/data/")


def test_watchdog_fires_when_a_data_worker_stops_mid_run(tmp_path):
    # data.num_workers=1: batches come from a grain worker process. After a few steps it is stopped (SIGSTOP),
    # as a worker stuck in I/O would be: the loop waits for its next batch forever. Steps reset the clock.
    workdir = tmp_path / "run"
    over = {"data.num_workers": 1, "run.hang_minutes": 0.1, "run.hang_startup_minutes": 5}
    proc = start(command(workdir, **over), tmp_path)  # start-up (spawning the worker, compiling) is slower
    wait_for(logged_step(workdir, 3), proc, "step 3")
    workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"],
                                                  capture_output=True, text=True).stdout.split()]
    assert workers, "no grain worker process found"
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        stopped = time.time()
        out, err = finish(proc, tmp_path, timeout=90)
        assert proc.returncode == EXIT_HUNG, err[-3000:]
        assert time.time() - stopped >= 0.1 * 60 - 1
        last = max(json.loads(row)["step"] for row in (workdir / "metrics.jsonl").read_text().splitlines())
        assert_hang_report(workdir, err, f"after step {last}", 'vffn_jax/train/loop.py", line')
        assert "grain" in (workdir / "hang-0.txt").read_text()  # the main thread waits on the data pipeline
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)  # the watchdog kills its workers; this is for a failing run
            except ProcessLookupError:
                pass
