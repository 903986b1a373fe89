"""Export a run's parameters for inference: a params-only checkpoint plus `config.json`.

    vffn-export --workdir runs/tiny --out runs/tiny-export [--step N] [--dtype bfloat16] [--overwrite]

The output is a run directory without optimizer state or data-iterator state (about a third of a
training checkpoint in f32, a sixth in bf16), checksummed like every checkpoint, that `eval.py` and
`generate.py` restore exactly as they restore a run. `--dtype` casts the stored parameters and records
it as `model.param_dtype`; the compute dtype (`model.dtype`) is unchanged. Local or gs:// either side.
`--out` must not exist or be an empty folder; `--overwrite` deletes what it holds first (never the run itself).

Exit status: 0 done, 2 missing run/step, invalid dtype, a non-empty output without --overwrite, or a damaged
checkpoint.
"""
from __future__ import annotations

import dataclasses
import os

DTYPES = ("float32", "bfloat16", "float16")


def write_params_run(out, cfg, step: int, params) -> None:
    """Writes a params-only run directory: `out/config.json` (`cfg`) and `out/checkpoints/<step>` holding `params`
    only (no optimizer or data-iterator state), committed and checksummed like every checkpoint."""
    import jax

    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.rundir import RunDir

    RunDir.at(out).prepare(cfg, is_main=jax.process_index() == 0)
    manager = ckpt.make_manager(out, cfg.run)
    ckpt.save(manager, step, params, None, force=True)
    ckpt.wait_until_finished(manager)
    manager.close()


def _check_out(out, workdir, overwrite: bool) -> bool:
    """ConfigError naming --out unless it is missing, an empty folder, or (`overwrite`) a folder other than the run
    and its parents; returns whether it has contents to delete."""
    from vffn_jax import storage
    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.config import ConfigError

    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"--out={out} is a file, not a folder; export into a new or empty folder")
    if not any(out.iterdir()):
        return False
    if not overwrite:
        steps = ckpt.all_steps(out)
        what = f"already holds checkpoints {steps}" if steps else "already exists and is not an empty folder"
        raise ConfigError(f"--out={out} {what}; export into a new or empty folder, or pass --overwrite to delete "
                          "what it holds first")
    run, here = str(storage.as_path(workdir)), str(out)
    if not storage.is_gcs(out):  # the same folder under another spelling (a symlink) too
        run, here = os.path.realpath(run), os.path.realpath(here)
    if run == here or run.startswith(here.rstrip("/") + "/"):
        raise ConfigError(f"--out={out} holds the run --workdir={workdir}: --overwrite would delete it; export into "
                          "another folder")
    return True


def export(workdir, out, *, step: int | None = None, dtype: str | None = None, devices=None,
           overwrite: bool = False) -> dict:
    """Writes `out/config.json` and `out/checkpoints/<step>/params`; returns a summary. A non-empty `out` is a
    ConfigError, unless `overwrite`: then its contents are deleted (after the run's params are restored)."""
    import jax

    from vffn_jax.checkpoint import restore
    from vffn_jax import storage
    from vffn_jax.config import ConfigError

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}: choose one of {DTYPES}")
    out = storage.as_path(out)
    clear = _check_out(out, workdir, overwrite)
    run = restore.restore_params(workdir, step, devices, runs_model=False)
    saved = restore.load_run_config(workdir)  # the run's own mesh and batch, not the ones fitted to this host
    cfg = saved if dtype is None else dataclasses.replace(saved, model=dataclasses.replace(saved.model, param_dtype=dtype))
    params = run.params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), run.params)
    if clear and jax.process_index() == 0:
        for child in out.iterdir():
            if child.is_dir():
                child.rmtree()
            else:
                child.unlink()
    write_params_run(out, cfg, run.step, params)
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return {"workdir": str(run.workdir), "step": run.step, "out": str(out), "param_dtype": cfg.model.param_dtype,
            "param_bytes": int(n_bytes)}
