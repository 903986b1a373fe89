"""A run directory: its layout, and the one place that reads and writes its small files.

    WORKDIR/config.json          the resolved config (written at the start of every run)
    WORKDIR/checkpoints/<step>/  Orbax checkpoints (checkpoint/manager.py reads and writes them)
    WORKDIR/metrics.jsonl        one JSON row per logging step, `eval/...` rows for held-out metrics
    WORKDIR/tb/                  TensorBoard events and profiler traces
    WORKDIR/compile_cache/       JAX's persistent compilation cache (run.compile_cache=auto)
    WORKDIR/depth_per_layer.png  eval.py's loops-per-layer plot (depth-routed variants)
    WORKDIR/hang-<process>.txt   thread stacks of a hung process (train/watchdog.py)
    WORKDIR/peer-lost-<process>.txt  why a process ended when another one was lost (parallel/peer_loss.py)
    WORKDIR/supervisor-<host>.jsonl  each start and exit under `vffn-supervise` (cli/supervise.py)
    WORKDIR/native-<host>-<pid>.log  the native runtime's output of a multi-process run (parallel/peer_loss.py)

Local paths and gs:// alike (etils.epath through `storage`). Every module that needs one of these
files asks a `RunDir` for it, so the layout is written down once.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath

from vffn_jax import storage
from vffn_jax.config import Config, ConfigError, config_from_dict


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: epath.Path

    CONFIG = "config.json"
    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tb"
    COMPILE_CACHE = "compile_cache"
    DEPTH_PLOT = "depth_per_layer.png"

    @classmethod
    def at(cls, path) -> "RunDir":
        return path if isinstance(path, RunDir) else cls(storage.as_path(path))

    def __str__(self) -> str:
        return str(self.path)

    # --------------------------------------------------------------------- paths

    @property
    def config_path(self) -> epath.Path:
        return self.path / self.CONFIG

    @property
    def checkpoints(self) -> epath.Path:
        return self.path / self.CHECKPOINTS

    @property
    def metrics_path(self) -> epath.Path:
        return self.path / self.METRICS

    @property
    def tensorboard(self) -> epath.Path:
        return self.path / self.TENSORBOARD

    @property
    def compile_cache(self) -> epath.Path:
        return self.path / self.COMPILE_CACHE

    @property
    def depth_plot(self) -> epath.Path:
        return self.path / self.DEPTH_PLOT

    def committed_steps(self) -> list[int]:
        """The checkpoint steps whose save committed (Orbax renames a step's folder to its bare number last),
        from one listing: no Orbax, no collective, so a process can ask while its peers are gone."""
        try:
            return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit())
        except FileNotFoundError:
            return []

    # --------------------------------------------------------------------- the config

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config_dict(self) -> dict[str, Any]:
        """The saved config as plain JSON; FileNotFoundError or ConfigError naming the path and the fix."""
        if not self.path.exists():
            raise FileNotFoundError(
                f"run directory {self.path} does not exist; create it by training, e.g. "
                f"`python train.py --config tiny --workdir {self.path}`")
        if not self.has_config():
            raise FileNotFoundError(
                f"{self.config_path} not found: {self.path} is not a training run directory (train.py writes "
                f"config.json at the start of a run); train into it with `python train.py --workdir {self.path} ...`")
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{self.config_path} is not valid JSON ({e}); restore it from the run or re-train") from None

    def read_config(self) -> Config:
        return config_from_dict(self.read_config_dict(), str(self.config_path))

    def prepare(self, cfg: Config, is_main: bool) -> "RunDir":
        """Checks the run directory can be written (a missing bucket fails here, before anything is compiled),
        refuses to resume a run whose model differs, and saves the resolved config beside the run."""
        storage.check_writable(self.path, "--workdir")
        if self.has_config():
            saved = self.read_config()
            if saved.model != cfg.model:
                diff = {k: (getattr(saved.model, k), getattr(cfg.model, k)) for k in saved.model.__dataclass_fields__
                        if getattr(saved.model, k) != getattr(cfg.model, k)}
                raise ConfigError(f"{self.path} holds a run with a different model (saved vs now: {diff}); "
                                  "re-run with the same flags to resume, or use a new --workdir")
        if is_main:
            storage.write_text_atomic(self.config_path, cfg.to_json())
        return self

    # --------------------------------------------------------------------- metrics

    def metrics(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl ([] before the first log step)."""
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def last_logged_step(self) -> int | None:
        """The step of the last row of metrics.jsonl (None before the first log step)."""
        rows = self.metrics()
        return rows[-1]["step"] if rows else None

    def final_eval(self, step: int) -> dict[str, Any] | None:
        """The last held-out (`eval/...`) row logged at `step`, or None."""
        rows = [r for r in self.metrics() if r["step"] == step and "eval/loss" in r]
        return rows[-1] if rows else None
