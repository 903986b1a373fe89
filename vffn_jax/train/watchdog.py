"""What stops a run from outside the training loop: Ctrl-C, and a hang.

Ctrl-C (`CtrlC`, owned by actions.PreemptionWatch): the first SIGINT asks the loop to stop as a preemption
notice does: the step reached is saved and committed, then train.py prints one line and exits
EXIT_INTERRUPTED (130). A second Ctrl-C ends the process at once (130, no save); a save in flight is
left as Orbax's temporary folder, which restores ignore, so a committed checkpoint is never damaged.
The signal is read from Python's wakeup fd by a thread, so a second Ctrl-C works even while the main
thread is inside a long XLA compile or a blocked C call. With several processes the first Ctrl-C
becomes a preemption notice (SIGTERM to this process, which JAX's distributed runtime propagates):
every process saves the same step at the sync point; the one that was interrupted exits 130, the
others 75. Ctrl-C before the loop (start-up) exits 130 at once (train.py).

Hang watchdog (`HangWatchdog`, run.hang_minutes > 0; `watch_for_hangs` wraps loop.train): progress is a
finished training step (dispatched: a hung device computation or collective blocks the host at the
next step's loss check, one step later). The clock starts when `train` is called: start-up (data
set-up, restore, the first compile) has run.hang_startup_minutes (default: hang_minutes) to finish the
first step. The time between two steps includes that step's periodic eval, in-loop task scoring and
checkpoint save (saves are asynchronous; the commit wait at the end counts too): set hang_minutes
above the longest of those.
When no step finished for that long, every process (each has its own watchdog) writes the stacks of
all its Python threads (`faulthandler`) to stderr and to WORKDIR/hang-<process_index>.txt (written
locally and copied when the workdir is on gs://), then exits EXIT_HUNG (86) so a supervisor restarts
the run from its last checkpoint.
"""
from __future__ import annotations

import faulthandler
import functools
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from vffn_jax.errors import EXIT_HUNG, EXIT_INTERRUPTED

# --------------------------------------------------------------------------- Ctrl-C


class CtrlC:
    """Counts SIGINTs while installed: the first calls `on_first` (from a helper thread), the second ends the
    process with EXIT_INTERRUPTED. Installed only in the main thread (signal handlers live there)."""

    def __init__(self, on_first: Callable[[], None] = lambda: None):
        self.on_first = on_first
        self.pressed = threading.Event()
        self._installed = False
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        if threading.current_thread() is not threading.main_thread() or ignored:
            return  # signal handlers live in the main thread; an ignored SIGINT (nohup, `cmd &`) stays ignored
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)  # the thread acts
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._listen, name="vffn_jax-ctrl-c", daemon=True)
        self._thread.start()
        self._installed = True

    def _listen(self) -> None:
        while True:
            try:
                data = self._read.recv(64)
            except OSError:
                return
            if not data or 0 in data:  # closed, or close()'s sentinel
                return
            for signum in data:
                if signum != signal.SIGINT:
                    continue
                if self.pressed.is_set():
                    exit_now("again (Ctrl-C): stopped without saving")
                self.pressed.set()
                self.on_first()

    def close(self) -> None:
        if not self._installed:
            return
        self._installed = False
        signal.set_wakeup_fd(self._previous_fd)
        signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous_handler is None else self._previous_handler)
        try:
            self._write.send(b"\0")
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._read.close()
        self._write.close()


def exit_now(why: str) -> None:
    """Ends the process (and its data workers) at once with EXIT_INTERRUPTED, from any thread: no cleanup,
    no traceback."""
    _bounded(lambda: os.write(terminal_fd(), f"\nvffn_jax: interrupted {why}\n".encode()), 2)  # may be a full pipe
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(EXIT_INTERRUPTED)


# --------------------------------------------------------------------------- hangs


class HangWatchdog:
    """A daemon thread that dumps every thread's stack and exits EXIT_HUNG when `beat` was not called for
    `minutes` (see the module docstring)."""

    def __init__(self, minutes: float, workdir, process_index: int, *, startup_minutes: float = 0.0):
        from vffn_jax import storage  # here, not when it fires: the hang may be holding the import lock

        self.limit_s, self.process_index, self.storage = 60.0 * minutes, process_index, storage
        self.startup_limit_s = 60.0 * (startup_minutes or minutes)  # until the first step
        self.target = storage.as_path(workdir) / f"hang-{process_index}.txt"
        self.last_beat, self.step = time.monotonic(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vffn_jax-hang-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self.last_beat, self.step = time.monotonic(), step

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.limit_s / 10, self.startup_limit_s / 10)):
            if time.monotonic() - self.last_beat >= self._limit():
                self._fire()

    def _limit(self) -> float:
        return self.startup_limit_s if self.step is None else self.limit_s

    def _fire(self) -> None:
        # Each part is bounded, so a hang cannot also hang the watchdog: stderr (a pipe nobody reads, a stdout
        # lock the hung thread holds) gets 10 s, the copy to gs:// 60 s.
        where = "during start-up (no step yet)" if self.step is None else f"after step {self.step}"
        startup = self.step is None and self.startup_limit_s != self.limit_s
        field = "run.hang_startup_minutes" if startup else "run.hang_minutes"
        header = (f"vffn_jax: hang: no training step finished for {self._limit() / 60:g} min ({field}) "
                  f"{where}; process {self.process_index}'s thread stacks follow and are in {self.target}; exiting "
                  f"with status {EXIT_HUNG} (re-run the same command to resume from the last checkpoint)\n")
        _bounded(lambda: _dump(header, terminal_fd(), flush=True), 10)
        _bounded(lambda: self._write_file(header), 70)
        for child in multiprocessing.active_children():  # data workers would outlive os._exit
            child.kill()
        os._exit(EXIT_HUNG)

    def _write_file(self, header: str) -> None:
        """WORKDIR/hang-<i>.txt; on gs:// written locally first, then copied."""
        remote = self.storage.is_gcs(self.target)
        try:
            local = (Path(tempfile.mkdtemp(prefix="vffn_jax_hang_")) / self.target.name if remote
                     else Path(os.fspath(self.target)))
            local.parent.mkdir(parents=True, exist_ok=True)
            with open(local, "w") as f:
                _dump(header, f)
            if remote:
                _bounded(lambda: self.target.write_bytes(local.read_bytes()), 60)
        except OSError as e:
            os.write(terminal_fd(), f"vffn_jax: could not write {self.target}: {e}\n".encode())


def terminal_fd() -> int:
    """The descriptor of Python's stderr: fd 2, or the terminal when a multi-process run sent fd 2 (the native
    runtime's output) to a log file (parallel/peer_loss.py)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor (tests)
        return 2


def _dump(header: str, file, flush: bool = False) -> None:
    """`header`, then every thread's Python stack, to a file object or descriptor."""
    if flush:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or broken stream must not stop the dump
                pass
    if isinstance(file, int):
        os.write(file, header.encode())
    else:
        file.write(header)
        file.flush()
    faulthandler.dump_traceback(file=file, all_threads=True)


def _bounded(fn: Callable[[], None], seconds: float) -> None:
    """Runs `fn` in a daemon thread and waits at most `seconds` for it."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout=seconds)


_active: HangWatchdog | None = None


def watch_for_hangs(train_fn):
    """Decorates `train(cfg, workdir, ...)`: while it runs, a HangWatchdog of cfg.run.hang_minutes (if > 0)
    watches it, fed by the `Heartbeat` action; it stops when `train` returns or raises."""

    @functools.wraps(train_fn)
    def train(cfg, workdir, *args, **kwargs):
        global _active
        if not cfg.run.hang_minutes:
            return train_fn(cfg, workdir, *args, **kwargs)
        import jax

        _active = HangWatchdog(cfg.run.hang_minutes, workdir, jax.process_index(),
                               startup_minutes=cfg.run.hang_startup_minutes)
        try:
            return train_fn(cfg, workdir, *args, **kwargs)
        finally:
            _active.close()
            _active = None

    return train


def beat(step: int) -> None:
    """A training step finished (the `Heartbeat` action of train/actions.py calls this after every step)."""
    if _active is not None:
        _active.beat(step)
