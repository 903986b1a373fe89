"""Export a run's parameters for inference: a params-only checkpoint plus `config.json`.

    vffn-export --workdir runs/tiny --out runs/tiny-export [--step N] [--dtype bfloat16]

The output is a run directory without optimizer state or data-iterator state (about a third of a
training checkpoint in f32, a sixth in bf16), checksummed like every checkpoint, that `eval.py` and
`generate.py` restore exactly as they restore a run. `--dtype` casts the stored parameters and records
it as `model.param_dtype`; the compute dtype (`model.dtype`) is unchanged. Local or gs:// either side.

Exit status: 0 done, 2 missing run/step, invalid dtype or output, or a damaged checkpoint.
"""
from __future__ import annotations

import dataclasses

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


def export(workdir, out, *, step: int | None = None, dtype: str | None = None, devices=None) -> dict:
    """Writes `out/config.json` and `out/checkpoints/<step>/params`; returns a summary."""
    import jax

    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.checkpoint import restore
    from vffn_jax import storage
    from vffn_jax.config import ConfigError

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}: choose one of {DTYPES}")
    run = restore.restore_params(workdir, step, devices)
    saved = restore.load_run_config(workdir)  # the run's own mesh and batch, not the ones fitted to this host
    cfg = saved if dtype is None else dataclasses.replace(saved, model=dataclasses.replace(saved.model, param_dtype=dtype))
    params = run.params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), run.params)
    out = storage.as_path(out)
    if ckpt.all_steps(out):
        raise ConfigError(f"--out={out} already holds checkpoints; export into an empty folder")
    write_params_run(out, cfg, run.step, params)
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return {"workdir": str(run.workdir), "step": run.step, "out": str(out), "param_dtype": cfg.model.param_dtype,
            "param_bytes": int(n_bytes)}
