"""`vffn-supervise [--max-restarts N] [--backoff S] -- <training command>`: re-run a training command until it is
done, on the exit statuses that mean "re-run the same command".

    vffn-supervise -- vffn-train --config 354m --workdir gs://my-bucket/runs/354m
    vffn-supervise --max-restarts 20 --backoff 30 -- python train.py --config tiny --workdir runs/tiny

The command runs as a child process. When it exits with a restartable status (vffn_jax/errors.py: 75 preempted
or a peer process lost, 86 hung, 4 peers missing at start-up) or is killed by a signal (kill -9, the OOM
killer, a native abort), it is started again after a backoff (S seconds, doubling each restart, at most 5
minutes) while the restart budget lasts; it resumes from its newest intact checkpoint by itself. Any other
status ends the supervisor with that status: 0 done, 2 bad input, 3 a mismatched checkpoint or a diverged run,
130 interrupted by the user, 1 a crash (a bug: restarting would repeat it).

Run one supervisor on every host of a multi-host run, each around that host's process: when one process is
lost the others exit 75 (vffn_jax/parallel/peer_loss.py), every supervisor restarts its own, and the restarted
processes meet at the coordinator again and resume from the same checkpoint.

SIGTERM and SIGINT (Ctrl-C) are passed on to the child, and the supervisor then stops after the child exits,
with its status: a preempted VM's notice or your Ctrl-C saves the step reached, as it does without
a supervisor. The child runs in its own session, so a Ctrl-C at the terminal reaches it once, through here.

Each start and exit is a JSON line in WORKDIR/supervisor-<host>.jsonl (the training command's --workdir; --log
FILE to put it elsewhere): time, event, exit status and its meaning, the step reached (last logged) and the last
committed checkpoint, the restart count and what happens next; each exit is also one line on stderr.
"""
from __future__ import annotations

import argparse
import datetime
import json
import signal
import socket
import subprocess
import sys
import threading
import time

from vffn_jax import errors
from vffn_jax.cli import runner

MAX_BACKOFF_S = 300.0


def build_parser() -> argparse.ArgumentParser:
    p = runner.parser("vffn-supervise", __doc__)
    p.add_argument("--max-restarts", type=int, default=10, metavar="N",
                   help="restarts allowed before giving up with the child's last status (default 10)")
    p.add_argument("--backoff", type=float, default=10.0, metavar="S",
                   help="seconds before the first restart, doubling with each further one up to 300 (default 10)")
    p.add_argument("--log", default=None, metavar="FILE|gs://...",
                   help="where the JSON lines of starts and exits go (default: WORKDIR/supervisor-<host>.jsonl of "
                        "the command's --workdir; none when it has none)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command and its arguments")
    return p


def workdir_of(command: list[str]) -> str | None:
    """The value of `--workdir` in a training command line."""
    for i, arg in enumerate(command):
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
    return None


def meaning(status: int) -> str:
    if status > 128 and status - 128 in signal.valid_signals() and status not in errors.EXIT_STATUSES:
        return f"killed by {signal.Signals(status - 128).name}"
    return errors.EXIT_STATUSES.get(status, "an unexpected status")


def restartable(returncode: int) -> bool:
    """A restartable exit status, or death by a signal (returncode < 0)."""
    return returncode < 0 or returncode in errors.RESTARTABLE


class Supervisor:
    def __init__(self, command: list[str], *, max_restarts: int, backoff_s: float, log: str | None,
                 workdir: str | None):
        self.command, self.max_restarts, self.backoff_s = command, max_restarts, backoff_s
        self.log, self.workdir = log, workdir
        self.child: subprocess.Popen | None = None
        self.stopping = threading.Event()  # a forwarded SIGTERM / SIGINT: no more restarts

    def record(self, **fields) -> None:
        now = time.time()
        row = {"time": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
               "unix_time": round(now, 3), **fields}
        if self.log is None:
            return
        from vffn_jax import storage

        try:
            path = storage.as_path(self.log)
            path.parent.mkdir(parents=True, exist_ok=True)
            if storage.is_gcs(path):  # an object cannot be appended to; one supervisor per host writes its own
                old = path.read_text() if path.exists() else ""
                storage.write_text_atomic(path, old + json.dumps(row) + "\n")
            else:
                with open(path, "a") as f:  # one write per line: supervisors on one machine can share the file
                    f.write(json.dumps(row) + "\n")
        except Exception as e:  # noqa: BLE001 - a log that cannot be written must not stop the supervision
            print(f"vffn-supervise: could not write {self.log}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def progress(self) -> dict:
        """The step reached (last logged) and the last committed checkpoint of the run, where known."""
        if self.workdir is None:
            return {}
        from vffn_jax.rundir import RunDir

        try:
            run = RunDir.at(self.workdir)
            steps = run.committed_steps()
            return {"step": run.last_logged_step(), "checkpoint": steps[-1] if steps else None}
        except Exception:  # noqa: BLE001 - a run directory not written yet, or unreadable: report without it
            return {}

    def on_signal(self, signum, frame) -> None:
        """SIGTERM / SIGINT: no more restarts; the signal goes on to the child, each time it comes (a second
        Ctrl-C stops a training run at once, as at a terminal)."""
        self.stopping.set()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self) -> int:
        restarts = 0
        while True:
            self.child = subprocess.Popen(self.command, start_new_session=True)
            self.record(event="start", pid=self.child.pid, restart=restarts, command=self.command)
            returncode = self.child.wait()
            status = returncode if returncode >= 0 else 128 - returncode
            again = restartable(returncode) and not self.stopping.is_set() and restarts < self.max_restarts
            wait_s = min(self.backoff_s * 2 ** restarts, MAX_BACKOFF_S)
            nxt = (f"restart {restarts + 1}/{self.max_restarts} in {wait_s:g} s" if again else
                   "stop: " + ("signalled" if self.stopping.is_set() else
                               "restart budget spent" if restartable(returncode) else "not restartable"))
            where = self.progress()
            self.record(event="exit", status=status, meaning=meaning(status), restart=restarts, next=nxt, **where)
            print(f"vffn-supervise: the command exited {status} ({meaning(status)})"
                  + (f" at step {where['step']}" if where.get("step") is not None else "")
                  + (f", last committed checkpoint {where['checkpoint']}" if where.get("checkpoint") else "")
                  + f"; {nxt}", file=sys.stderr, flush=True)
            if not again:
                return status
            if self.stopping.wait(wait_s):
                return status
            restarts += 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("error: give the training command after --, e.g. vffn-supervise -- vffn-train --config tiny "
              "--workdir runs/tiny", file=sys.stderr)
        return errors.EXIT_BAD_INPUT
    if args.max_restarts < 0 or args.backoff < 0:
        print(f"error: --max-restarts={args.max_restarts} and --backoff={args.backoff} must be >= 0", file=sys.stderr)
        return errors.EXIT_BAD_INPUT
    workdir = workdir_of(command)
    log = args.log or (f"{workdir.rstrip('/')}/supervisor-{socket.gethostname()}.jsonl" if workdir else None)
    sup = Supervisor(command, max_restarts=args.max_restarts, backoff_s=args.backoff, log=log, workdir=workdir)
    previous = {s: signal.signal(s, sup.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return sup.run()
    except FileNotFoundError as e:  # the command itself does not exist
        print(f"error: cannot run {command[0]!r}: {e}", file=sys.stderr)
        return errors.EXIT_BAD_INPUT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def console() -> None:
    """The `vffn-supervise` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console()
