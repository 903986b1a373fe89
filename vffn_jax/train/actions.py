"""The periodic actions of the training loop: logging, checkpointing, evaluation, preemption, profiling.

The loop (`train/loop.py`) only runs steps. Every action has the same small lifecycle (`Action`): after each
step the loop calls `observe(state)` on all of them, asks each whether it is `due(state)` and calls those that
are; `close()` runs when the loop ends (in reverse order, so the checkpoint commits before the rest shuts down)
and `on_error(exc)` when it raises. Adding a periodic feature is one class here and one line in
`train/build.py`. Every decision that stops the loop or saves a checkpoint
is the same on every process: step counts are, and the two time- or signal-driven decisions are
agreed on explicitly (`PreemptionWatch` through JAX's preemption sync point, `Checkpointer`'s time
backstop through a broadcast from process 0).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.perf import flops as flops_lib
from vffn_jax.train import goodput
from vffn_jax import storage
from vffn_jax.rundir import RunDir
from vffn_jax.train import watchdog
from vffn_jax.errors import EXIT_MISMATCH
from vffn_jax.parallel import peer_loss


class TrainingDivergedError(RuntimeError):
    """Loss or gradient norm became NaN/inf; the last good checkpoint is kept."""

    exit_status = EXIT_MISMATCH  # the run diverged


@dataclasses.dataclass
class LoopState:
    """What the actions see after a step."""

    step: int
    end: int  # this invocation stops after this step (train.steps, or --stop-at)
    params: Any = None
    opt_state: Any = None
    metrics: Any = None  # this step's metrics, still on device
    stop_reason: str | None = None  # "preempted" (SIGTERM) or "interrupted" (Ctrl-C): save this step and stop
    last_saved: int = 0

    @property
    def at_end(self) -> bool:
        return self.step == self.end or self.stop_reason is not None


# --------------------------------------------------------------------------- the lifecycle


class Action:
    """A piece of the training loop. Every hook is optional; the defaults do nothing.

    - `observe(state)`: after every step, before `due` (collect metrics, poll for a preemption notice).
    - `due(state) -> bool`: whether to run now; must give the same answer on every process.
    - `__call__(state)`: run (the loop charges the time to the goodput bucket `bucket`).
    - `close()`: the loop ended, normally or not: flush, commit, release (called once, in reverse order).
    - `on_error(exc)`: the loop is ending with `exc` (before `close`), e.g. to record why.
    """

    bucket = "other"

    def observe(self, state: "LoopState") -> None:
        pass

    def due(self, state: "LoopState") -> bool:
        return False

    def __call__(self, state: "LoopState") -> None:
        pass

    def close(self) -> None:
        pass

    def on_error(self, exc: BaseException) -> None:
        pass


class PeerWatch(Action):
    """Ends this process cleanly (one line, exit 75) when the loop fails because another process was lost;
    first in the list, so nothing waits on the lost process first (parallel/peer_loss.py)."""

    def __init__(self, workdir):
        peer_loss.watch_run(workdir)

    def observe(self, state: "LoopState") -> None:
        peer_loss.reached(state.step)

    def on_error(self, exc: BaseException) -> None:
        if peer_loss.is_peer_failure(exc):
            peer_loss.lost_in(exc)

    def close(self) -> None:
        peer_loss.stop_watching()  # called last: after the final checkpoint committed


class Heartbeat(Action):
    """Tells the hang watchdog (train/watchdog.py, run.hang_minutes) that a step finished; it never runs."""

    def observe(self, state: "LoopState") -> None:
        watchdog.beat(state.step)


# --------------------------------------------------------------------------- divergence


def check_finite(step: int, metrics, last_saved: int) -> None:
    loss, gnorm = jax.device_get((metrics["total_loss"], metrics["grad_norm"]))
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
        raise TrainingDivergedError(
            f"loss={loss} grad_norm={gnorm} at step {step}: training stopped. The last good checkpoint "
            f"(step {last_saved}) is kept; lower train.lr or raise train.warmup_frac before resuming.")


class DivergenceGuard:
    """Checks each step's loss one step late, so dispatch stays ahead of the host, and at once before
    anything is logged or saved: a NaN step is never logged or checkpointed."""

    def __init__(self):
        self._pending: tuple[int, Any] | None = None

    def __call__(self, state: LoopState, *, now: bool) -> None:
        if self._pending is not None:
            check_finite(*self._pending, state.last_saved)
        self._pending = (state.step, state.metrics)
        if now:
            check_finite(*self._pending, state.last_saved)
            self._pending = None


# --------------------------------------------------------------------------- preemption


class PreemptionWatch(Action):
    """Turns a preemption notice into `state.stop_reason = "preempted"` at the same step on every process.

    Multi-process: JAX's distributed runtime catches SIGTERM itself and propagates the notice;
    `reached_preemption_sync_point(step)` is True on every process at one agreed step. Single process:
    a SIGTERM handler sets a flag, read after the next step. Either way the loop then saves that step,
    waits for the save to commit, and ends; re-running the same command resumes.
    Ctrl-C (watchdog.CtrlC) is the same notice with `stop_reason = "interrupted"` (exit 130); with several
    processes it is raised as SIGTERM to this process, so they agree on the step as for a preemption.
    """

    def __init__(self):
        self._notice = threading.Event()
        multi = jax.process_count() > 1
        self._ctrl_c = watchdog.CtrlC(on_first=lambda: os.kill(os.getpid(), signal.SIGTERM) if multi else None)
        self._previous = None
        self._installed = False
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def _on_sigterm(self, signum, frame) -> None:
        self._notice.set()

    def observe(self, state: LoopState) -> None:
        from jax.experimental import multihost_utils

        if self._notice.is_set() or (self._ctrl_c.pressed.is_set() and jax.process_count() == 1) or (
                jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(state.step)):
            state.stop_reason = "interrupted" if self._ctrl_c.pressed.is_set() else "preempted"

    def close(self) -> None:
        self._ctrl_c.close()
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


# --------------------------------------------------------------------------- actions


class MetricsLog(Action):
    """Averages metrics over each window of `log_every` steps; writes a row and updates the progress bar.
    With a `clock` (train.goodput.Goodput) the row has the `perf/` fields: step split, goodput, badput."""

    bucket = "logging"  # the goodput bucket the loop charges this action's time to

    def __init__(self, logger, bar, *, every: int, tokens_per_step: int, flops_per_token: float, n_devices: int,
                 summarize: Callable[[list[dict]], dict], clock=None, peak_flops: float = 0.0):
        """`logger` (MetricLogger) and `bar` (Progress) are this action's: `close` closes both."""
        self.logger, self.bar, self.every = logger, bar, every
        self.tokens_per_step, self.flops_per_token, self.n_devices = tokens_per_step, flops_per_token, n_devices
        self.summarize = summarize
        self.peak = goodput.resolve_peak_flops(peak_flops)
        self.clock, self.snapshot = clock, None
        self.window: list[dict] = []
        self.t_window = time.perf_counter()

    def restart_clock(self) -> None:  # after an evaluation, so tokens/s counts training (and saving) only
        self.t_window = time.perf_counter()

    def observe(self, state: LoopState) -> None:
        self.window.append(state.metrics)

    def due(self, state: LoopState) -> bool:
        return state.step % self.every == 0 or state.at_end

    def __call__(self, state: LoopState) -> None:
        elapsed = time.perf_counter() - self.t_window
        row = self.summarize(jax.device_get(self.window))
        tps = len(self.window) * self.tokens_per_step / max(elapsed, 1e-9)
        row.update(tokens_per_sec=tps, mfu=flops_lib.mfu(tps, self.flops_per_token, self.n_devices, self.peak))
        if self.clock is not None:
            perf, self.snapshot = self.clock.report(self.snapshot, len(self.window))
            row.update(perf)
        self.logger.log(state.step, row)
        self.bar.update(state.step, row)
        self.window = []
        self.restart_clock()

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


class Checkpointer(Action):
    """Saves every `every` steps, at the end of the invocation, on preemption, and at least every
    `minutes` of wall time (0 = off) as a backstop when steps are slow. Saves are asynchronous."""

    bucket = "save"

    def __init__(self, manager, data_iter, *, every: int, minutes: float, check_every: int):
        self.manager, self.data_iter = manager, data_iter
        self.every, self.minutes, self.check_every = every, minutes, check_every
        self.last_time = time.monotonic()

    def _time_due(self, state: LoopState) -> bool:
        # Only every check_every steps, and decided by process 0 for all: clocks differ between hosts.
        if not self.minutes or state.step % self.check_every:
            return False
        due = time.monotonic() - self.last_time >= 60.0 * self.minutes
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def due(self, state: LoopState) -> bool:
        # the time check (a collective on several processes) is reached at the same steps everywhere: the
        # conditions before it depend on the step only
        return state.step % self.every == 0 or state.at_end or self._time_due(state)

    def __call__(self, state: LoopState) -> None:
        ckpt.save(self.manager, state.step, state.params, state.opt_state, self.data_iter,
                  force=state.at_end)
        state.last_saved = state.step
        self.last_time = time.monotonic()

    def close(self) -> None:
        ckpt.wait_until_finished(self.manager)  # a preemption save commits (with its checksums) before we return


class PeriodicEval(Action):
    """Held-out evaluation every `every` steps (0 = only the final one, which the trainer runs)."""

    bucket = "eval"

    def __init__(self, evaluate: Callable[[Any], dict], log: Callable[[int, dict], None], *, every: int,
                 total_steps: int, on_done: Callable[[], None] = lambda: None):
        self.evaluate, self.log, self.every, self.total_steps = evaluate, log, every, total_steps
        self.on_done = on_done

    def due(self, state: LoopState) -> bool:
        return bool(self.every) and state.step % self.every == 0 and state.step != self.total_steps \
            and state.stop_reason is None

    def __call__(self, state: LoopState) -> None:
        self.log(state.step, {f"eval/{k}": v for k, v in self.evaluate(state.params).items()})
        self.on_done()


class Profiler(Action):
    """A `jax.profiler` trace of training steps `first`..`last` (1-based, as logged) written under
    `<workdir>/tb/plugins/profile/<time>/` on every process: TensorBoard's profile tab shows it, and the
    `.trace.json.gz` opens in Perfetto. The trace goes to a local folder first (the profiler writes
    local files only) and is uploaded when the workdir is on gs://."""

    def __init__(self, first: int, last: int, workdir, *, start_step: int):
        self.first, self.last, self.workdir = first, last, storage.as_path(workdir)
        self.remote = storage.is_gcs(self.workdir)
        self.local = (Path(tempfile.mkdtemp(prefix="vffn_jax_profile_")) if self.remote
                      else Path(os.fspath(RunDir.at(self.workdir).tensorboard)))
        self.active = False
        if start_step == first - 1:  # resuming right before the window: open it before the first step
            self._start()

    def _start(self) -> None:
        jax.profiler.start_trace(str(self.local))
        self.active = True

    def due(self, state: LoopState) -> bool:
        opens = state.step == self.first - 1 and not self.active
        return opens or (self.active and (state.step >= self.last or state.at_end))

    def __call__(self, state: LoopState) -> None:
        if not self.active:
            self._start()
            return
        jax.block_until_ready(state.metrics)  # the traced steps' device work belongs in the trace
        self.close()

    def close(self) -> None:  # a run that ends inside the window still writes its trace
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        if self.remote:
            storage.upload_tree(self.local, RunDir.at(self.workdir).tensorboard)
            shutil.rmtree(self.local, ignore_errors=True)


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """`run.profile_steps` "A:B" -> (A, B); "" -> None. Validated in config.validate."""
    if not text:
        return None
    first, _, last = text.partition(":")
    return int(first), int(last or first)
