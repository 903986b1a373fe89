"""Run output for people and tools: a progress bar, a JSONL metrics file and TensorBoard events."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vffn_jax import storage
from vffn_jax.rundir import RunDir


class MetricLogger:
    """Appends `{"step": s, ...}` rows to `metrics.jsonl` and scalars to TensorBoard (`tb/`).

    On resume, rows past the restored step are dropped so curves never hold a step twice.
    A `gs://` workdir cannot be appended to (objects are immutable) and tensorboardX's own GCS
    writer is broken, so both files are written to a local folder and uploaded whole at most every
    `sync_seconds` and at `close()`.
    """

    def __init__(self, workdir, *, enabled: bool = True, resume_step: int = 0, sync_seconds: float = 30.0):
        self.enabled = enabled
        self.tb = None
        self.sinks: list = []  # more destinations of every row, e.g. train.wandb_log.WandbSink (process 0)
        if not enabled:
            return
        self.workdir = storage.as_path(workdir)
        self.remote = storage.is_gcs(self.workdir)
        self.local = Path(tempfile.mkdtemp(prefix="vffn_jax_run_")) if self.remote else Path(os.fspath(self.workdir))
        self.path = self.local / RunDir.METRICS
        self.sync_seconds, self.last_sync = sync_seconds, time.monotonic()
        remote_metrics = RunDir.at(self.workdir).metrics_path
        if self.remote and remote_metrics.exists():
            self.path.write_bytes(remote_metrics.read_bytes())
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter  # writes event files without TensorFlow

        self.tb = SummaryWriter(str(self.local / RunDir.TENSORBOARD), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        for key, value in row.items():
            if isinstance(value, (int, float)) and value is not None:
                self.tb.add_scalar(key, value, step)
            elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                for i, v in enumerate(value):  # per-layer values, e.g. nothing nested deeper
                    self.tb.add_scalar(f"{key}/{i}", v, step)
        self.tb.flush()
        for sink in self.sinks:
            sink.log(step, row)
        if self.remote and time.monotonic() - self.last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Uploads metrics.jsonl and the TensorBoard event files of a gs:// workdir."""
        if not (self.enabled and self.remote):
            return
        run = RunDir.at(self.workdir)
        run.metrics_path.write_bytes(self.path.read_bytes())
        storage.upload_tree(self.local / RunDir.TENSORBOARD, run.tensorboard)
        self.last_sync = time.monotonic()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.tb is not None:
            self.tb.close()
            self.sync()
            if self.remote:
                shutil.rmtree(self.local, ignore_errors=True)
            self.tb = None


class Progress:
    """tqdm bar over steps with loss, tokens/s and the ETA tqdm computes."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.interactive = sys.stderr.isatty()  # in a log file, print plain lines instead of redrawing a bar
        self.bar = tqdm(total=total, initial=initial, disable=not (enabled and self.interactive), file=sys.stderr,
                        dynamic_ncols=True, unit="step", mininterval=1.0)
        self.total, self.initial, self.last = total, initial, initial
        self.start = time.perf_counter()

    def update(self, step: int, row: dict[str, Any]) -> None:
        self.bar.update(step - self.last)
        self.last = step
        postfix = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_sec']:,.0f}"}
        if "mean_depth" in row:
            postfix["depth"] = f"{row['mean_depth']:.2f}"
        if row.get("mfu"):
            postfix["mfu"] = f"{100 * row['mfu']:.1f}%"
        if "perf/goodput" in row:
            postfix["goodput"] = f"{100 * row['perf/goodput']:.0f}%"
        self.bar.set_postfix(postfix, refresh=False)
        if self.enabled and not self.interactive:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step - self.initial, 1) * (self.total - step)
            fields = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"step {step}/{self.total} {fields} eta={tqdm.format_interval(eta)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
