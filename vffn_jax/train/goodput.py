"""Where a training process's wall time goes: a stopwatch with named buckets, goodput and the step split.

`Goodput` charges every second since the process started to exactly one bucket: the *current* one,
which `with clock("save"): ...` switches for the duration of a block (blocks nest; leaving one returns
to the bucket around it). It starts in "startup" at the process's start time, so the Python and JAX
imports before `train()` count too. The training loop uses these buckets:

  productive (the step time)   data_wait  waiting for the next batch (the host input pipeline)
                               compute    dispatching the step and waiting for the device (one step late:
                                          `DivergenceGuard` reads the previous step's loss)
                               logging    the metrics row: device-to-host copy, metrics.jsonl, TensorBoard, W&B
  non-productive               startup    process start to the first step, except restore
                               restore    resuming from a checkpoint (or train.init_from)
                               compile    the first step of this process (tracing + XLA compile)
                               eval       held-out (and in-loop task) evaluation, with its compile
                               save       checkpoint saves (the asynchronous part runs on beside the steps)
                               other      anything else (profiler start/stop, the end of the run)

goodput = productive / wall since the process started; the `badput/<bucket>` fractions and goodput sum
to 1. Pure Python and injectable clocks: tests drive it with a fake clock.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator

STEP_PARTS = ("data_wait", "compute", "logging")  # the productive buckets: their sum is the step time
BUCKETS = ("startup", "restore", "compile", *STEP_PARTS, "eval", "save", "other")


def process_start_time() -> float:
    """When this process started, in `time.time()` seconds (psutil; the import time of this module without it)."""
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001 - no psutil, or a platform without process times
        return _IMPORTED


_IMPORTED = time.time()


class Goodput:
    """A stopwatch over named buckets (see the module docstring). `now` is a monotonic clock in seconds;
    `started` the wall time already spent before this object existed (default: since the process started)."""

    def __init__(self, *, now: Callable[[], float] = time.monotonic, started: float | None = None):
        self.now = now
        if started is None:
            started = max(0.0, time.time() - process_start_time())
        self.totals = dict.fromkeys(BUCKETS, 0.0)
        self.totals["startup"] = started
        self.current, self.since = "startup", now()

    def switch(self, bucket: str) -> str:
        """Charges the time since the last switch to the current bucket, makes `bucket` current, returns the
        previous one."""
        if bucket not in self.totals:
            raise ValueError(f"unknown goodput bucket {bucket!r}; one of {', '.join(BUCKETS)}")
        t = self.now()
        self.totals[self.current] += t - self.since
        previous, self.current, self.since = self.current, bucket, t
        return previous

    @contextlib.contextmanager
    def __call__(self, bucket: str) -> Iterator[None]:
        previous = self.switch(bucket)
        try:
            yield
        finally:
            self.switch(previous)

    def snapshot(self) -> dict[str, float]:
        """Seconds per bucket so far, the current bucket's running time included."""
        out = dict(self.totals)
        out[self.current] += self.now() - self.since
        return out

    def report(self, previous: dict[str, float] | None, steps: int) -> tuple[dict[str, float], dict[str, float]]:
        """The `perf/` fields of a metrics row for the `steps` steps since snapshot `previous` (None: since the
        start), and the new snapshot to pass next time.

        perf/step_time, perf/data_wait, perf/compute, perf/logging: seconds per step in the window (the three
        parts sum to perf/step_time; a first step's compile is not part of them); perf/goodput: productive /
        wall since the process started; perf/badput/<bucket>: each non-productive bucket's share of that wall
        time; perf/wall: seconds since the process started."""
        now = self.snapshot()
        before = previous or dict.fromkeys(BUCKETS, 0.0)
        n = max(steps, 1)
        row = {f"perf/{part}": (now[part] - before[part]) / n for part in STEP_PARTS}
        row["perf/step_time"] = sum(row[f"perf/{part}"] for part in STEP_PARTS)
        wall = sum(now.values())
        row["perf/goodput"] = sum(now[part] for part in STEP_PARTS) / wall if wall > 0 else 0.0
        for bucket in BUCKETS:
            if bucket not in STEP_PARTS:
                row[f"perf/badput/{bucket}"] = now[bucket] / wall if wall > 0 else 0.0
        row["perf/wall"] = wall
        return row, now


def measure_peak_flops(seconds: float = 0.5, n: int = 1024) -> float:
    """FLOP/s of a float32 [n,n]x[n,n] matmul on the first device, best of repeated runs for about
    `seconds`: the `run.peak_flops=-1` stand-in for a datasheet peak on CPUs (MFU is then relative to what
    this host's matmul reaches, not to a vendor figure)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile
    best, deadline = float("inf"), time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() >= deadline:
            return 2.0 * n**3 / max(best, 1e-9)


def resolve_peak_flops(setting: float) -> float | None:
    """`run.peak_flops`: > 0 as given, -1 measured (`measure_peak_flops`), 0 the device's entry in
    perf/chips.py's table (None on CPUs: no MFU)."""
    from vffn_jax.perf import flops as flops_lib

    return measure_peak_flops() if setting == -1 else flops_lib.peak_flops_per_device(override=setting)
