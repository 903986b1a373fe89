"""The training loop, and only the loop: steps, then the actions that are due (train/actions.py).

`train(cfg, workdir)` trains (or resumes) a run in a local or `gs://` workdir: `train/build.py` assembles the run,
`loop` runs it. Re-running it with the same config resumes from the newest checkpoint that verifies. On a
preemption notice (SIGTERM, or JAX's preemption sync point across hosts) every process saves the same step, waits
for it to commit, and returns with `summary["preempted"] = True` (train.py then exits with EXIT_PREEMPTED); Ctrl-C
does the same with `summary["interrupted"] = True` (exit 130). run.hang_minutes: train/watchdog.py.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from vffn_jax.config import Config
from vffn_jax.errors import EXIT_PREEMPTED  # re-exported: the status a preempted run ends with
from vffn_jax.parallel.sharding import global_batch
from vffn_jax.train import watchdog
from vffn_jax.train.actions import TrainingDivergedError
from vffn_jax.train.build import Run, build_run

__all__ = ["train", "loop", "TrainingDivergedError", "EXIT_PREEMPTED"]


@watchdog.watch_for_hangs  # run.hang_minutes > 0: from here on a step must finish every hang_minutes
def train(cfg: Config, workdir, *, devices=None, progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) `cfg` in `workdir`; returns a summary with the final held-out metrics.

    `stop_at` ends this invocation after that step (checkpointed), as a preemption would; re-running
    continues the same schedule to `cfg.train.steps`.
    """
    return loop(build_run(cfg, workdir, devices=devices, progress=progress, stop_at=stop_at))


def loop(run: Run) -> dict[str, Any]:
    state, clock, final = run.state, run.clock, None
    clock.switch("compute")  # start-up ends; the loop's own time (and the wait for the device) is compute
    try:
        while state.step < state.end and state.stop_reason is None:
            with clock("data_wait"):
                batch = global_batch(next(run.data_it), run.mesh)
            with clock("compute" if state.step > run.start else "compile"):  # this process's first step compiles
                state.params, state.opt_state, state.metrics = run.train_step(
                    state.params, state.opt_state, batch, jnp.asarray(state.step, jnp.int32))
            state.step += 1
            for action in run.actions:
                action.observe(state)
            due = [action for action in run.actions if action.due(state)]
            run.guard(state, now=bool(due))  # never log or save a step before its loss is known to be finite
            for action in due:
                with clock(action.bucket):
                    action(state)
        if state.step == run.cfg.train.steps:
            with clock("eval"):
                final = run.run_eval(state.params)
                run.log(state.step, {f"eval/{k}": v for k, v in final.items()})
    except BaseException as e:
        for action in run.actions:
            action.on_error(e)
        raise
    finally:
        for action in reversed(run.actions):
            action.close()
    return {"step": state.step, "eval": final, "is_main": run.is_main, "preempted": state.stop_reason == "preempted",
            "interrupted": state.stop_reason == "interrupted", "checkpoint_dir": run.checkpoint_dir,
            **{k: run.info[k] for k in ("params_total", "params_non_embedding")}}
