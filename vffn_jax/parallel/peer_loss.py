"""A lost peer ends every surviving process cleanly: one line, exit 75, the details in the run directory.

On a pod the commonest failure is a host that dies, is preempted without notice or loses its network. The
survivors learn it one of two ways, and both end here (`lost`):
  * a collective with the lost process fails (on CPU/GPU, Gloo/NCCL report the broken connection at once):
    the exception reaches the training loop, whose `PeerWatch` action calls `lost_in(exception)`;
  * `watch_peers`' thread asks the coordination service every second or so which processes are alive: a
    process whose heartbeats stopped for `--heartbeat-timeout` seconds is missing from the answer, and a lost
    coordinator does not answer at all (a refused connection at once; silence for twice the heartbeat timeout).
    The service runs with JAX's recoverability on (parallel/distributed.py), so it only marks the process lost
    instead of making every client abort with a native stack dump (SIGABRT, 134).
A lost coordinator is also seen by JAX's own client thread, which aborts the process (LOG(FATAL): a native stack
trace, SIGABRT) before Python can act. So a multi-process run sends the native runtime's output (fd 2: glog
lines, Gloo, stack traces) to a log file instead of the terminal (`redirect_native_output`; Python's own
stderr stays on the terminal), and `catch_native_abort` turns that abort into the same clean exit 75 when the
log says the coordination service failed (any other native abort stays an abort).
Either way every surviving process prints one line naming what was lost (the process index, and its host
where the error names one), the step reached and the last committed checkpoint, writes the error and its
traceback to WORKDIR/peer-lost-<process>.txt, and exits EXIT_PEER_LOST (75): the status of a preemption,
"re-run the same command", which `vffn-supervise` does. Nothing committed is lost: a restart resumes from the
newest intact checkpoint. The process ends with os._exit: an orderly shutdown would wait on barriers with the
lost process (minutes) and then abort anyway.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import NoReturn

from vffn_jax.errors import EXIT_PEER_LOST

# Words of the errors a broken connection to another process raises (Gloo on CPU, NCCL on GPU, gRPC of the
# coordination service); only consulted when the run has several processes.
PEER_ERROR_PATTERNS = ("gloo", "nccl", "connection reset by peer", "connection closed by peer", "socket closed",
                       "coordination service", "coordinationservice", "heartbeat")
EXIT_BARRIER_S = 120  # how long a process waits at exit for the others to finish too
_TASK_RE = re.compile(r"/task:(\d+)")
_ADDRESS_RE = re.compile(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:(\d+)")  # IPv4 HOST:PORT in an error message
# what a failed exchange with the coordination service itself says (so: the coordinator is gone)
COORDINATOR_WORDS = ("coordinationservice/heartbeat", "rpc to coordination service", "pollforerror",
                     "leader task", "coordination service is unavailable")


class _Progress:
    """Where this process is: set at start-up and by the training loop, read when a peer is lost."""

    def __init__(self):
        self.process_index: int | None = None
        self.num_processes = 1
        self.coordinator: str | None = None
        self.workdir = None
        self.step: int | None = None
        self.terminal_fd = 2  # where the one line goes (the terminal, also when fd 2 goes to the native log)
        self.native_log: str | None = None
        self.exit_status: int | None = None  # the command is done and exits with this (`leaving`)
        self.lock = threading.Lock()  # the first report wins; a second waits for the exit


progress = _Progress()


def joined(process_index: int, num_processes: int, coordinator: str | None) -> None:
    progress.process_index, progress.num_processes, progress.coordinator = process_index, num_processes, coordinator


def watch_run(workdir) -> None:
    """The run directory the details file goes to (set once the run is assembled)."""
    progress.workdir = workdir


def reached(step: int) -> None:
    progress.step = step


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is a failed exchange with another process of a multi-process run."""
    if progress.num_processes <= 1:
        return False
    text = f"{type(e).__name__}: {e}".lower()
    return any(p in text for p in PEER_ERROR_PATTERNS)


def describe(text: str) -> str:
    """What was lost, as far as the error says: a process index, the coordinator, or a host."""
    tasks = sorted({int(t) for t in _TASK_RE.findall(text)} - {progress.process_index})
    if tasks:
        return ", ".join(f"process {t}" + (" (the coordinator)" if t == 0 else "") for t in tasks)
    coordinator = f"the coordinator (process 0 at {progress.coordinator or 'the auto-detected address'})"
    hosts = [f"{h}:{p}" for h, p in _ADDRESS_RE.findall(text)]
    if progress.process_index != 0 and (progress.coordinator in hosts
                                        or any(w in text.lower() for w in COORDINATOR_WORDS)):
        return coordinator
    if progress.num_processes == 2 and progress.process_index in (0, 1):
        return f"process {1 - progress.process_index}"  # the only other one
    return "a peer process" + (f" (at {hosts[0]})" if hosts else "")


def lost_in(e: BaseException) -> NoReturn:
    """Ends this process for the exception `e`, a failed exchange with a lost peer."""
    first = (str(e).strip().splitlines() or [""])[0][:160]
    lost(_who_is_gone() or describe(str(e)), "".join(traceback.format_exception(e)),
         cause=f"{type(e).__name__}: {first}")


def _who_is_gone() -> str | None:
    """The other process of a 2-process run; else None (a failed collective does not say which peer it lost, and
    the coordination service says so only after the heartbeat timeout: the watch thread reports it then)."""
    if _watch is None or _watch.n != 2:
        return None
    other = 1 - (progress.process_index or 0)
    return f"process {other}" + (f" (the coordinator, at {progress.coordinator})" if other == 0 else "")


class _PeerWatch:
    """The thread of `watch_peers`. JAX's `get_live_nodes` is a rendezvous: it answers once every live process
    asked, so a silent process holds it until the service drops it, after --heartbeat-timeout. No answer at all
    for twice that (plus a margin) means the coordinator itself stopped answering."""

    def __init__(self, client, n: int, heartbeat_timeout_s: float):
        self.client, self.n = client, n
        self.interval_s = min(1.0, heartbeat_timeout_s / 4)
        self.silence_s = 2 * heartbeat_timeout_s + 10
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, name="vffn_jax-peer-watch", daemon=True).start()

    def _ask(self, answer: list) -> None:
        try:
            answer.append(self.client.get_live_nodes(list(range(self.n))))
        except Exception as e:  # noqa: BLE001 - any failure to reach the service means it is gone
            answer.append(e)

    def _watch(self) -> None:
        coordinator = f"the coordinator (process 0 at {progress.coordinator or 'the auto-detected address'})"
        while not self.stopped.wait(self.interval_s):
            answer: list = []
            asking = threading.Thread(target=self._ask, args=(answer,), daemon=True)
            asking.start()
            asking.join(self.silence_s)
            if self.stopped.is_set():
                return
            if not answer:
                lost(coordinator if progress.process_index != 0 else "a process that stopped answering",
                     f"the coordination service did not answer for {self.silence_s:g} s\n")
            if isinstance(answer[0], Exception):
                lost(coordinator, "asking the coordination service which processes are alive failed:\n"
                     + "".join(traceback.format_exception(answer[0])))
            missing = sorted(set(range(self.n)) - set(answer[0]))
            if missing:
                lost(", ".join(f"process {i}" for i in missing),
                     f"the coordination service reports processes {missing} as gone (no heartbeat for "
                     f"--heartbeat-timeout); alive: {sorted(answer[0])}\n")


_watch: _PeerWatch | None = None


def watch_peers(coordinator: str | None, heartbeat_timeout_s: float) -> None:
    """After `jax.distributed.initialize`: records who this process is and starts the watch thread, which
    `stop_watching` ends before the processes part (the end of the loop; the interpreter's exit)."""
    global _watch
    import atexit

    import jax
    from jax._src import distributed

    joined(jax.process_index(), jax.process_count(), coordinator)
    client = distributed.global_state.client
    if client is None or jax.process_count() <= 1:
        return
    _watch = _PeerWatch(client, jax.process_count(), heartbeat_timeout_s)
    atexit.register(_leave_together, client)  # after JAX's own exit hook: runs before its shutdown


def stop_watching() -> None:
    """The run ended normally: processes leave from here on, which is not a loss."""
    if _watch is not None:
        _watch.stopped.set()


def leaving(status: int) -> None:
    """The command finished with `status` (called by the console entry just before it exits)."""
    progress.exit_status = status


def _leave_together(client) -> None:
    """At exit, wait (bounded) until every process got here: with recoverability on, JAX's own shutdown no
    longer does, and a process that left early would look lost to one still finishing. Then leave at once with
    the command's status: JAX's shutdown would now race the coordinator's exit (its client aborts when the
    service is gone first), and everything worth keeping was committed and closed by the command itself."""
    stop_watching()
    try:
        client.wait_at_barrier("vffn_jax_exit", EXIT_BARRIER_S * 1000)
    except Exception:  # noqa: BLE001 - a peer that never arrives: leave anyway
        pass
    if progress.exit_status is not None:
        _flush_and_exit(progress.exit_status)


def _flush_and_exit(status: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep the process
            pass
    os._exit(status)


def lost(what: str, details: str, cause: str = "") -> NoReturn:
    """One line on stderr, the details in WORKDIR/peer-lost-<process>.txt, then exit EXIT_PEER_LOST."""
    progress.lock.acquire()  # never released: one report per process
    me = progress.process_index if progress.process_index is not None else "?"
    where = _details_file(details + _native_tail())
    step = f"after step {progress.step}" if progress.step is not None else "before the first step"
    saved = _last_committed()
    because = f" ({cause})" if cause else ""
    line = (f"vffn_jax: process {me}: lost {what} {step}{because}; last committed checkpoint: "
            f"{saved if saved is not None else 'none'}; details in {where}; re-run the same command to resume "
            f"(exit {EXIT_PEER_LOST})\n")
    _bounded(lambda: os.write(progress.terminal_fd, line.encode()), 5)  # stderr may be a full pipe
    for child in multiprocessing.active_children():  # data workers would outlive os._exit
        child.kill()
    os._exit(EXIT_PEER_LOST)


def _last_committed() -> int | None:
    if progress.workdir is None:
        return None
    from vffn_jax.rundir import RunDir

    found: list[int | None] = [None]

    def look():
        steps = RunDir.at(progress.workdir).committed_steps()
        found[0] = steps[-1] if steps else None

    _bounded(look, 10)
    return found[0]


def _details_file(details: str) -> str:
    """Writes the details beside the run (a gs:// run: a local file, then copied, bounded); returns its name."""
    name = f"peer-lost-{progress.process_index if progress.process_index is not None else 'x'}.txt"
    local = Path(tempfile.gettempdir()) / f"vffn_jax-{os.getpid()}-{name}"
    target = None
    if progress.workdir is not None:
        from vffn_jax import storage

        target = storage.as_path(progress.workdir) / name
        if not storage.is_gcs(target):
            local = Path(os.fspath(target))
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(details)
    except OSError:
        return "(not written: the run directory cannot be written)"
    if target is not None and str(target) != str(local):
        done = threading.Event()
        _bounded(lambda: (target.write_text(details), done.set()), 30)
        return str(target) if done.is_set() else str(local)
    return str(local)


def _bounded(fn, seconds: float) -> None:
    """Runs `fn` in a daemon thread and waits at most `seconds` (the lost peer may hang any I/O with it)."""
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout=seconds)


# --------------------------------------------------------------------------- the native runtime's output

NATIVE_FATAL = ("distributed service detected fatal errors", "coordination service", "coordination_service")
NATIVE_TAIL_BYTES = 64 << 10
_SIGNAL_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)
_keep: list = []  # the installed C handler must outlive this module's functions


def native_log_path(workdir) -> str:
    """Where the native runtime's output of this process goes: WORKDIR/native-<host>-<pid>.log for a local run
    directory, else a local temporary file (named in the lost-peer details)."""
    from vffn_jax import storage

    name = f"native-{socket.gethostname()}-{os.getpid()}.log"
    if workdir is not None and not storage.is_gcs(workdir):
        folder = Path(os.fspath(storage.as_path(workdir)))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return str(folder / name)
        except OSError:
            pass
    return str(Path(tempfile.gettempdir()) / f"vffn_jax-{name}")


def redirect_native_output(path: str) -> None:
    """fd 2 (what native code writes) to the file `path`; Python's sys.stderr stays on the terminal."""
    sys.stderr.flush()
    terminal = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = open(terminal, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",  # noqa: SIM115
                      errors="backslashreplace")
    progress.terminal_fd, progress.native_log = terminal, path


def _native_tail() -> str:
    if not progress.native_log:
        return ""
    try:
        with open(progress.native_log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - NATIVE_TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return f"\n--- the end of the native runtime's log ({progress.native_log}) ---\n{tail}"


def catch_native_abort() -> None:
    """A SIGABRT (JAX's client aborting because the coordination service failed) ends the process as `lost`
    does; any other abort proceeds (the default action: SIGABRT)."""
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)

    def on_abort(signum: int) -> None:
        if progress.exit_status is not None:  # the service went away while this process was leaving anyway
            _flush_and_exit(progress.exit_status)
        text = _native_tail()
        if any(word in text.lower() for word in NATIVE_FATAL):
            found = [line for line in text.splitlines() if "fatal errors" in line or "absl::Status" in line]
            lost(describe(text), "JAX's coordination client gave up" + (f": {found[-1].strip()}" if found else "") + "\n")
        libc.signal(signal.SIGABRT, None)  # SIG_DFL: abort as it would have
        libc.abort()

    handler = _SIGNAL_HANDLER(on_abort)
    _keep.append(handler)
    libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))
