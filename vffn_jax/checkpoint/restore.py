"""Params-only restore of a run for inference (eval, generation, export, scoring).

Reads the run's `config.json`, rebuilds the model abstractly for the devices that exist *now* (the saved
mesh when it fits, else pure data parallelism; `fit_to_devices`), and restores only the `params` item
of `checkpoints/<step>`, verified and resharded by Orbax into the new layout.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from vffn_jax import config as config_lib
from vffn_jax import storage
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.config import Config, ConfigError, MeshConfig
from vffn_jax.rundir import RunDir


class StepNotFoundError(FileNotFoundError):
    """The requested checkpoint step does not exist; the message lists the available steps."""


# --------------------------------------------------------------------------- loading


def load_run_config(workdir: str | Path) -> Config:
    """The run's saved config; FileNotFoundError naming the missing path and how to create it."""
    return RunDir.at(workdir).read_config()


def resolve_step(workdir: str | Path, step: int | None) -> int:
    """`step`, or the latest one; StepNotFoundError listing what exists."""
    cdir = ckpt.checkpoint_dir(workdir)
    steps = ckpt.all_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoints in {cdir}; train with `python train.py --workdir {workdir}` (a checkpoint is "
            "written every run.ckpt_every steps and at the last step)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise StepNotFoundError(f"no checkpoint for step {step} in {cdir}; available steps: {steps}")
    return step


def fit_to_devices(cfg: Config, n_devices: int) -> tuple[Config, int, list[str]]:
    """(config with a mesh that fits `n_devices`, eval batch size, notes on what was changed)."""
    notes: list[str] = []
    try:
        config_lib.validate(cfg, n_devices=n_devices)
        return cfg, cfg.train.batch_size, notes
    except ConfigError as e:
        reason = str(e)
    flat = MeshConfig(data=-1, fsdp=1, tensor=1)
    if cfg.mesh != flat:
        notes.append(f"saved mesh {dataclasses.asdict(cfg.mesh)} does not fit {n_devices} device(s) ({reason}); "
                     f"using data={n_devices}, fsdp=1, tensor=1")
        cfg = dataclasses.replace(cfg, mesh=flat)
    batch = cfg.train.batch_size
    if batch % n_devices:
        new = max(n_devices, batch // n_devices * n_devices)
        notes.append(f"eval batch {batch} is not divisible by {n_devices} devices; evaluating batches of {new} "
                     "sequences instead (the held-out tokens differ from training's eval/ metrics)")
        batch = new
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    # evaluation splits its batch like training (train.grad_accum): keep the largest split that still fits
    accum = max(a for a in range(1, cfg.train.grad_accum + 1)
                if cfg.train.grad_accum % a == 0 and batch % (a * n_devices) == 0) if batch % n_devices == 0 else 1
    if accum != cfg.train.grad_accum:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
    config_lib.validate(cfg, n_devices=n_devices)  # anything left (e.g. vocab vs tensor) is a real error
    return cfg, batch, notes


@dataclasses.dataclass
class RestoredRun:
    """A run's parameters restored for inference onto the devices that exist now."""

    workdir: Any
    step: int
    cfg: Config  # the saved config, its mesh (and eval batch) fitted to the devices
    setup: Any  # placement.Setup
    params: Any
    eval_batch: int
    notes: list[str]


# What `--set` may change when a run is restored for inference (eval.py, generate.py): how the same
# parameters are executed, and which held-out data they are evaluated on; never their shapes, the method or
# the tokenizer (the model's vocabulary)
INFERENCE_OVERRIDES = ("model.depth_exec", "model.depth_block", "model.attention", "model.dtype",
                       "data.path", "data.mixture", "data.holdout_fraction", "data.text_field", "data.cache_dir",
                       "data.verify_shards")


def with_inference_overrides(cfg: Config, overrides: dict[str, Any] | None) -> Config:
    """`cfg` with `--set` overrides of INFERENCE_OVERRIDES applied; ConfigError naming any other key."""
    if not overrides:
        return cfg
    for key in overrides:
        if key not in INFERENCE_OVERRIDES:
            raise ConfigError(f"--set {key}=...: a restored run can only change how it runs at inference and what it "
                              f"is evaluated on ({', '.join(INFERENCE_OVERRIDES)}); its shapes and training settings "
                              "are the run's own")
    return config_lib.config_from_dict(config_lib.apply_overrides(cfg, overrides).to_dict())


def restore_params(workdir, step: int | None = None, devices: Sequence[Any] | None = None,
                   overrides: dict[str, Any] | None = None, *, runs_model: bool = True) -> RestoredRun:
    """Params only (never the optimizer state or the data iterator), verified, resharded to `devices`.
    `overrides`: `--set` values of INFERENCE_OVERRIDES (e.g. `{"model.depth_exec": "masked"}`). `runs_model`
    (eval, generate; not an export): the config's kernels are checked against the devices' platform first."""
    import jax

    from vffn_jax.model import placement

    workdir = storage.as_path(workdir)
    saved_cfg = with_inference_overrides(load_run_config(workdir), overrides)
    step = resolve_step(workdir, step)
    devices = list(devices) if devices is not None else jax.devices()
    cfg, eval_batch, notes = fit_to_devices(saved_cfg, len(devices))
    if runs_model:  # e.g. model.attention=cudnn on a CPU host: refused here, not as a JAX error at the first step
        config_lib.validate(cfg, platform=devices[0].platform)
    s = placement.setup(cfg, devices)
    manager = ckpt.make_manager(workdir, cfg.run, read_only=True)
    try:
        params, _ = ckpt.restore(manager, step, ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings))
    finally:
        manager.close()
    return RestoredRun(workdir, step, cfg, s, params, eval_batch, notes)
