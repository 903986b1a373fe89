"""The training loop: restore or initialise, then steps, with the periodic actions of `loop_actions`.

`train(cfg, workdir)` trains (or resumes) a run in a local or `gs://` workdir. Re-running it with the
same config resumes from the newest checkpoint that verifies. On a preemption notice (SIGTERM, or
JAX's preemption sync point across hosts) every process saves the same step, waits for it to
commit, and returns with `summary["preempted"] = True` (train.py then exits with EXIT_PREEMPTED); Ctrl-C
does the same with `summary["interrupted"] = True` (exit 130). run.hang_minutes: train/watchdog.py.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax import compile_cache
from vffn_jax.train import goodput, wandb_log
from vffn_jax.train import watchdog
from vffn_jax.train.task_eval import TaskEval, suite_from_config
from vffn_jax.rundir import RunDir
from vffn_jax.config import Config, ConfigError
from vffn_jax.errors import EXIT_PREEMPTED  # re-exported: the status a preempted run ends with
from vffn_jax.train.actions import (Checkpointer, DivergenceGuard, LoopState, MetricsLog, PeriodicEval, PreemptionWatch, Profiler, TrainingDivergedError, parse_profile_steps)
from vffn_jax.train.metrics_log import MetricLogger, Progress
from vffn_jax.model.placement import describe, setup
from vffn_jax.evals.step import evaluate, make_eval_step, window_summary
from vffn_jax.parallel.sharding import global_batch
from vffn_jax.train.step import make_train_step
from vffn_jax.train.init_from import init_from_checkpoint
from vffn_jax.train.optimizer import init_train_state, make_optimizer, opt_state_shardings

__all__ = ["train", "TrainingDivergedError", "EXIT_PREEMPTED"]



def _say(is_main: bool, text: str) -> None:
    if is_main:
        print(f"vffn_jax: {text}", flush=True)


@watchdog.watch_for_hangs  # run.hang_minutes > 0: from here on a step must finish every hang_minutes
def train(cfg: Config, workdir, *, devices=None, progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) `cfg` in `workdir`; returns a summary with the final held-out metrics.

    `stop_at` ends this invocation after that step (checkpointed), as a preemption would; re-running
    continues the same schedule to `cfg.train.steps`.
    """
    from vffn_jax.data import pipeline as data_lib  # tfds/grain import lazily: dry runs and eval-only imports stay light
    from vffn_jax.data.tokenizer import load_tokenizer

    clock = goodput.Goodput()  # wall time since the process started, by bucket (perf/ fields of the metrics rows)
    is_main = jax.process_index() == 0
    wandb_log.check_installed(cfg.run.wandb if is_main else "")
    workdir = RunDir.at(workdir).prepare(cfg, is_main).path
    compile_cache.enable(cfg.run.compile_cache, workdir)
    s = setup(cfg, devices)
    if data_lib.uses_manifest(cfg.data):  # a pre-tokenised corpus: its tokenizer must be the run's
        data_lib.check_corpus(cfg.data, cfg.model.vocab_size)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {cfg.data.tokenizer!r} has {tokenizer.vocab_size} tokens but "
                          f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    if cfg.model.doc_mask and cfg.model.eos_id != tokenizer.eos_id:
        raise ConfigError(f"model.doc_mask=true splits documents at model.eos_id={cfg.model.eos_id}, but the EOS of "
                          f"data.tokenizer={cfg.data.tokenizer!r} is {tokenizer.eos_id}: set model.eos_id={tokenizer.eos_id}")
    task_suite = suite_from_config(cfg, s, tokenizer)  # run.tasks: checked and tokenised before the first step

    tx = make_optimizer(cfg.train)
    abstract_opt, opt_shardings = opt_state_shardings(tx, s)
    pcount, pindex = jax.process_count(), jax.process_index()
    data_it = data_lib.make_batch_iterator(cfg.data, "train", seq_len=cfg.train.seq_len,
                                           global_batch=cfg.train.batch_size, seed=cfg.data.shuffle_seed,
                                           process_index=pindex, process_count=pcount)
    eval_data = data_lib.eval_batches(cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                                      n_batches=cfg.run.eval_batches, process_index=pindex, process_count=pcount)

    manager = ckpt.make_manager(workdir, cfg.run)
    with clock("restore"):
        resumed = ckpt.resume_state(manager, ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings),
                                    ckpt.abstract_with_shardings(abstract_opt, opt_shardings), data_it,
                                    log=lambda text: _say(is_main, text.removeprefix("vffn_jax: ")))
    init_info = None  # continued pretraining: where the weights came from (logged as a step-0 metrics row)
    if resumed is not None:
        start, params, opt_state = resumed
        if cfg.train.init_from:
            _say(is_main, f"{workdir} has checkpoints: resuming at step {start}, train.init_from ignored")
    elif cfg.train.init_from:
        with clock("restore"):
            start, (params, opt_state, init_info) = 0, init_from_checkpoint(s, tx, opt_shardings,
                                                                            cfg.train.init_from, cfg.train.init_step)
    else:
        start, (params, opt_state) = 0, init_train_state(s, tx, opt_shardings)

    train_step = make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_shardings)
    eval_step = make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)
    info = describe(s)
    logger = MetricLogger(workdir, enabled=is_main, resume_step=start)
    if is_main and cfg.run.wandb:  # every row logged below goes to W&B too
        logger.sinks.append(wandb_log.start(cfg, workdir, info=info, log=lambda text: _say(True, text)))
    if init_info:
        logger.log(0, init_info)
    bar = Progress(total=cfg.train.steps, initial=start, enabled=is_main and progress)
    _say(is_main, f"{cfg.scale}/{cfg.variant} ffn={cfg.model.ffn} params={info['params_total']:,} "
                  f"mesh={info['mesh']} steps {start}->{cfg.train.steps} workdir={workdir}")

    run_eval = lambda p: evaluate(eval_step, p, eval_data, s.mesh)  # noqa: E731
    metrics_log = MetricsLog(logger, bar, every=cfg.run.log_every, tokens_per_step=cfg.train.batch_size * cfg.train.seq_len,
                             flops_per_token=info["flops_per_token_train"], n_devices=s.mesh.devices.size,
                             summarize=window_summary, clock=clock, peak_flops=cfg.run.peak_flops)
    actions = [
        watchdog.Heartbeat(),  # tells the hang watchdog that a step finished
        metrics_log,
        Checkpointer(manager, data_it, every=cfg.run.ckpt_every, minutes=cfg.run.ckpt_minutes,
                     check_every=cfg.run.log_every),
        PeriodicEval(run_eval, logger.log, every=cfg.run.eval_every, total_steps=cfg.train.steps,
                     on_done=metrics_log.restart_clock),
        *([TaskEval(task_suite, logger.log, every=cfg.run.tasks_every, total_steps=cfg.train.steps,
                    say=lambda text: _say(is_main, text), on_done=metrics_log.restart_clock)] if task_suite else []),
    ]
    window = parse_profile_steps(cfg.run.profile_steps)
    profiler = Profiler(*window, workdir, start_step=start) if window and window[1] > start else None
    if profiler:
        actions.append(profiler)
    guard, preemption = DivergenceGuard(), PreemptionWatch()
    state = LoopState(step=start, end=min(cfg.train.steps, stop_at) if stop_at else cfg.train.steps,
                      params=params, opt_state=opt_state, last_saved=start)
    final = None
    clock.switch("compute")  # start-up ends; the loop's own time (and the wait for the device) is compute
    try:
        while state.step < state.end and state.stop_reason is None:
            with clock("data_wait"):
                batch = global_batch(next(data_it), s.mesh)
            with clock("compute" if state.step > start else "compile"):  # this process's first step compiles
                state.params, state.opt_state, state.metrics = train_step(
                    state.params, state.opt_state, batch, jnp.asarray(state.step, jnp.int32))
            state.step += 1
            preemption.poll(state)
            metrics_log.collect(state)
            due = [action for action in actions if action.due(state)]
            guard(state, now=bool(due))  # never log or save a step before its loss is known to be finite
            for action in due:
                with clock(getattr(action, "bucket", "other")):
                    action(state)
        if state.step == cfg.train.steps:
            with clock("eval"):
                final = run_eval(state.params)
                logger.log(state.step, {f"eval/{k}": v for k, v in final.items()})
    finally:
        if profiler:  # a run that ends inside the window still writes its trace
            profiler.close()
        ckpt.wait_until_finished(manager)  # a preemption save commits (with its checksums) before we return
        preemption.close()  # after the commit: a second Ctrl-C while it commits still exits at once
        bar.close()
        logger.close()
    return {"step": state.step, "eval": final, "is_main": is_main, "preempted": state.stop_reason == "preempted",
            "interrupted": state.stop_reason == "interrupted",
            "checkpoint_dir": str(ckpt.checkpoint_dir(workdir)),
            **{k: info[k] for k in ("params_total", "params_non_embedding")}}
