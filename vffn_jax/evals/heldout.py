"""Held-out evaluation of a saved run: loss, perplexity, depth/expert routing statistics, FLOPs (docs/method.md).

`evaluate_run(workdir)` reads the run's `config.json`, rebuilds the model abstractly for the devices
that exist *now*, restores the parameters only (never the optimizer state or the data iterator) from
`checkpoints/<step>/params`, runs the inference-mode forward (`evals.step.make_eval_step`: no Gumbel
noise, each token runs its own argmax depth) over the first `n_batches` unshuffled batches of the
validation split, and returns a flat dict of plain Python numbers and lists.

Device adaptation (the run may have been trained on another device count):
  * the saved mesh is kept when it fits the devices and divides the batch (`config.validate`);
    otherwise the mesh becomes pure data parallelism over every device (`data=-1, fsdp=1, tensor=1`);
    Orbax reshards the saved parameters into the new layout either way;
  * the eval batch is the run's `train.batch_size`, so the evaluated tokens are exactly the ones
    training's `eval/` rows used. Only if the data-parallel size does not divide it, the eval batch
    is shrunk to the largest multiple of the device count below it (or raised to the device count when
    the batch has fewer rows than there are devices); the held-out tokens then differ from training's
    (a prefix of the same split). `result["notes"]` says when either adaptation happened.

Routing statistics are means over the evaluated tokens. Expert-load max/mean and CV are computed
per layer from the load aggregated over all evaluated tokens (`model.stats.load_balance`, as training's
`eval/` rows do), then averaged over layers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


from vffn_jax import config as config_lib
from vffn_jax.checkpoint.restore import restore_params
from vffn_jax.config import DEPTH_KINDS, ConfigError
from vffn_jax.evals import summary
from vffn_jax.rundir import RunDir


PLOT_NAME = RunDir.DEPTH_PLOT


# --------------------------------------------------------------------------- evaluation


def evaluate_run(workdir: str | Path, *, step: int | None = None, n_batches: int | None = None,
                 devices: Sequence[Any] | None = None, plot: bool = True,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluates a run's checkpoint on held-out data; see the module docstring for what is returned.

    Raises FileNotFoundError (missing workdir/config/checkpoints; StepNotFoundError for an unknown
    step), ConfigError (invalid saved config), ckpt.CheckpointMismatchError (config and checkpoint disagree).
    """
    import jax

    from vffn_jax.data import batches as data_lib
    from vffn_jax.perf import flops as flops_lib
    from vffn_jax.evals import step as step_lib

    if n_batches is not None and n_batches < 1:
        raise ConfigError(f"number of eval batches must be >= 1, got {n_batches}")
    run = restore_params(workdir, step, devices, overrides)
    workdir, step, cfg, s, params, eval_batch, notes = (run.workdir, run.step, run.cfg, run.setup, run.params,
                                                        run.eval_batch, run.notes)
    devices = list(s.mesh.devices.flat)
    n_batches = cfg.run.eval_batches if n_batches is None else n_batches

    batches = data_lib.eval_batches(cfg.data, seq_len=cfg.train.seq_len, global_batch=eval_batch, n_batches=n_batches,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    eval_step = step_lib.make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)
    raw = step_lib.evaluate(eval_step, params, batches, s.mesh)
    if len(batches) < n_batches:
        notes.append(f"the validation split holds only {len(batches)} batch(es) of {eval_batch} x "
                     f"{cfg.train.seq_len} tokens; evaluated those")

    m = cfg.model
    counts = flops_lib.count_params(s.abstract_params)
    result: dict[str, Any] = {
        "workdir": str(workdir), "step": step, "scale": cfg.scale, "variant": cfg.variant, "ffn": m.ffn,
        "depth_exec": m.depth_exec,
        "loss": raw["loss"], "perplexity": raw["perplexity"],
        "eval_batches": len(batches), "eval_batch_size": eval_batch, "seq_len": cfg.train.seq_len,
        "eval_tokens": len(batches) * eval_batch * cfg.train.seq_len,
        "mesh": dict(zip(s.mesh.axis_names, (int(x) for x in s.mesh.devices.shape))),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        **counts,
    }

    result.update(summary.routing_summary(m, cfg.train.seq_len, raw))
    if "depth_hist" in raw:
        result["tau"] = float(config_lib.tau_at(step, cfg.train))  # Gumbel temperature training had reached
    if m.ffn in DEPTH_KINDS:
        path = RunDir.at(workdir).depth_plot
        if plot and jax.process_index() == 0:
            summary.plot_depth(result, path)
            result["depth_plot"] = str(path)
        else:
            result["depth_plot"] = None
            result["depth_plot_note"] = "plot not requested"
    else:
        result["depth_plot"] = None
        result["depth_plot_note"] = f"skipped: ffn={m.ffn} has no depth router (every token runs a fixed number of loops)"
    result["notes"] = notes
    return result
