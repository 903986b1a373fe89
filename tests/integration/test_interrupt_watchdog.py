"""Ctrl-C and the hang watchdog, on the real command line: real signals to real `python train.py` processes,
real hangs (a storage server that never answers, a data worker that stops), nothing of the code under test
replaced."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.cli_errors import EXIT_HUNG, EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache"),
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
TINY = {"model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2, "model.d_ff": 64, "train.batch_size": 8,
        "train.seq_len": 32, "train.steps": 150, "run.log_every": 1, "run.ckpt_every": 1000, "run.eval_batches": 1}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")  # the default corpus, tokenised once for the module


def command(workdir, cache, **over):
    args = [sys.executable, "train.py", "--config", "tiny", "--workdir", str(workdir), "--no-progress"]
    for key, value in {**TINY, "data.cache_dir": str(cache), **over}.items():
        args += ["--set", f"{key}={value}"]
    return args


def start(args, tmp_path, env=ENV):
    """The process, with stdout/stderr in files: a stopped data worker may hold pipes open after its parent exits."""
    out, err = (open(tmp_path / name, "w") for name in ("stdout.txt", "stderr.txt"))
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err)


def finish(proc, tmp_path, timeout=60):
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()


def wait_for(condition, proc, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{what} never happened (rc={proc.poll()})")


def logged_step(workdir, step):
    path = Path(workdir) / "metrics.jsonl"
    return lambda: path.exists() and any(json.loads(line).get("step", 0) >= step
                                         for line in path.read_text().splitlines() if line.strip())


def sigint_taken(pid) -> bool:
    """No SIGINT pending for `pid` (Linux /proc): its handler has taken the last one sent."""
    rows = Path(f"/proc/{pid}/status").read_text().splitlines()
    pending = [int(row.split()[1], 16) for row in rows if row.startswith(("SigPnd:", "ShdPnd:"))]
    return len(pending) == 2 and not any(mask & (1 << (signal.SIGINT - 1)) for mask in pending)


def test_ctrl_c_saves_the_step_reached_the_same_command_resumes_and_a_second_ctrl_c_stops_at_once(tmp_path, cache):
    workdir = tmp_path / "run"
    args = command(workdir, cache)
    proc = start(args, tmp_path)
    wait_for(logged_step(workdir, 3), proc, "step 3")
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc, tmp_path)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    (saved,) = ckpt.all_steps(workdir)
    assert 3 <= saved < 150
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
    assert f"steps {saved}->150" in out
    assert "interrupted again (Ctrl-C): stopped without saving" in err and "saved checkpoint" not in err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert ckpt.all_steps(workdir) == [saved]
    assert ckpt.verify_step(workdir / "checkpoints", saved).status == "verified"


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path, cache):
    workdir = tmp_path / "run"
    proc = start(command(workdir, cache), tmp_path)
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


def test_watchdog_dumps_stacks_and_exits_when_the_storage_server_never_answers(tmp_path, cache):
    # A gs:// data source whose server accepts connections and never replies: start-up blocks in the listing.
    # The clock starts with train(), so start-up counts.
    server = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = {**ENV, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "t"}
    workdir = tmp_path / "run"
    with server:
        proc = start(command(workdir, cache, **{"data.path": "gs://stuck/corpus.jsonl", "run.hang_minutes": 0.05}),
                     tmp_path, env=env)
        out, err = finish(proc, tmp_path)
    assert proc.returncode == EXIT_HUNG, err[-3000:]
    assert_hang_report(workdir, err, "during start-up (no step yet)", "vffn_jax/data/")


def test_watchdog_fires_when_a_data_worker_stops_mid_run(tmp_path, cache):
    # data.num_workers=1: batches come from a grain worker process. After a few steps it is stopped (SIGSTOP),
    # as a worker stuck in I/O would be: the loop waits for its next batch forever. Steps reset the clock.
    workdir = tmp_path / "run"
    over = {"train.steps": 100000, "data.num_workers": 1, "run.hang_minutes": 0.1, "run.hang_startup_minutes": 5}
    proc = start(command(workdir, cache, **over), tmp_path)  # start-up (spawning the worker, compiling) is slower
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
