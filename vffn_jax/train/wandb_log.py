"""Weights & Biases logging, optional: `run.wandb = "PROJECT"` or `"PROJECT/ENTITY"` (off when "").

Process 0 only. `start()` opens (or, after a restart, resumes) the W&B run and returns a sink that
`MetricLogger` feeds every row it writes to metrics.jsonl: training windows, `perf/` timing, `eval/`
rows and any other action's rows, at the same step. Numbers are logged as they are, per-layer lists as
`KEY/<i>` (as in TensorBoard); an eval row with a depth histogram (`eval/depth_hist`, depth-routed
variants) also logs the loops-per-layer plot (eval.py's depth_per_layer.png, drawn from that row) as
the image `eval/depth_per_layer`. The W&B config is the resolved run config plus the run's size
(`info/...`).

Resuming: the run id is kept in `WORKDIR/wandb_run_id`; a re-run of the same command resumes that run
(`resume="allow"`), so a preempted and restarted run stays one W&B run. W&B's local files go to
`$WANDB_DIR` when set, else to `WORKDIR/wandb` (a local workdir) or `./wandb` (a gs:// one).
`WANDB_MODE=offline` writes the run locally only (`wandb sync DIR` uploads it later).

wandb is not a core requirement: `pip install -r requirements-wandb.txt`.
"""
from __future__ import annotations

import math
import os
import secrets
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

from vffn_jax import storage
from vffn_jax.config import Config, ConfigError
from vffn_jax.rundir import RunDir

INSTALL = "pip install -r requirements-wandb.txt"
RUN_ID_FILE = "wandb_run_id"
DEPTH_IMAGE = "eval/depth_per_layer"


def check_installed(spec: str) -> None:
    """A clear exit-2 error, before any work, when run.wandb is set and wandb is not installed."""
    if not spec:
        return
    try:
        import wandb  # noqa: F401 - imported here once, before any work, so that a missing install fails fast
    except ImportError:
        raise ConfigError(f"run.wandb={spec!r} needs the wandb package, which is not installed: {INSTALL} "
                          "(or drop run.wandb)") from None


def wandb_rows(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row as W&B keys: scalars as they are, per-layer lists as KEY/<i>; anything else
    (nested lists, strings, None, NaN) is left to metrics.jsonl."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in value):
            out.update({f"{key}/{i}": v for i, v in enumerate(value)})
    return out


class WandbSink:
    """Receives `MetricLogger.log(step, row)` calls and writes them to a W&B run."""

    def __init__(self, run, cfg: Config):
        self.run, self.cfg = run, cfg
        self.plots = Path(tempfile.mkdtemp(prefix="vffn_jax_wandb_"))

    def log(self, step: int, row: dict[str, Any]) -> None:
        import wandb

        data: dict[str, Any] = wandb_rows(row)
        if "eval/depth_hist" in row:
            data[DEPTH_IMAGE] = wandb.Image(str(self._depth_plot(step, row)))
        if data:
            self.run.log(data, step=step)

    def _depth_plot(self, step: int, row: dict[str, Any]) -> Path:
        from vffn_jax.depth_plot import plot_depth

        result = {"scale": self.cfg.scale, "variant": self.cfg.variant, "step": step,
                  **{k.removeprefix("eval/"): row[k] for k in ("eval/depth_hist", "eval/mean_depth", "eval/mean_alpha")
                     if k in row}}
        return Path(os.fspath(plot_depth(result, self.plots / f"depth_per_layer_{step}.png")))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
            shutil.rmtree(self.plots, ignore_errors=True)


def _run_id(workdir) -> str:
    path = storage.as_path(workdir) / RUN_ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    path.write_text(run_id + "\n")
    return run_id


def start(cfg: Config, workdir, *, info: dict[str, Any] | None = None, log=print) -> WandbSink | None:
    """Opens or resumes the run's W&B run (call on process 0 only); None when run.wandb is off."""
    spec = cfg.run.wandb
    if not spec:
        return None
    check_installed(spec)
    import wandb

    project, _, entity = spec.partition("/")
    workdir = storage.as_path(workdir)
    run_id = _run_id(workdir)
    local = os.environ.get("WANDB_DIR") or (None if storage.is_gcs(workdir) else os.fspath(RunDir.at(workdir).path / "wandb"))
    if local:
        Path(local).mkdir(parents=True, exist_ok=True)
    sizes = {k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str)) or k == "mesh"}  # no shardings
    config = {**cfg.to_dict(), "info": sizes}
    try:
        run = wandb.init(project=project, entity=entity or None, id=run_id, resume="allow", name=workdir.name,
                         config=config, dir=local, settings=wandb.Settings(silent=True, console="off"))
    except Exception as e:  # noqa: BLE001 - no login, no network, a bad entity: say which field and what to do
        raise ConfigError(f"run.wandb={spec!r}: W&B could not start the run ({type(e).__name__}: {e}). Log in with "
                          "`wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline and `wandb sync` later, "
                          "or drop run.wandb") from None
    where = f"{Path(run.dir).parent} (offline: `wandb sync` it to upload)" if run.offline else run.url
    log(f"W&B run {run.id} -> {where}")
    return WandbSink(run, cfg)
