"""Assemble a run from its config: everything the training loop needs, built once, in one object.

`build_run(cfg, workdir)` prepares the run directory and compile cache, places the model on the mesh, checks the
tokenizer against the model, builds the optimizer, the two data iterators (train and held-out), the checkpoint
manager, restores (or initialises, or `--init-from`s) the state, makes the jitted steps (memoised), the logger and
the list of actions (`train/actions.py`), each from its own part of the config. `train/loop.py` then only loops.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from vffn_jax import compile_cache
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.config import Config, validate
from vffn_jax.evals.step import evaluate, make_eval_step, window_summary
from vffn_jax.model.placement import describe, setup
from vffn_jax.rundir import RunDir
from vffn_jax.train import goodput, wandb_log
from vffn_jax.train.actions import (Action, Checkpointer, DivergenceGuard, Heartbeat, LoopState, MetricsLog,
                                    PeerWatch, PeriodicEval, PreemptionWatch, Profiler, parse_profile_steps)
from vffn_jax.train.init_from import init_from_checkpoint
from vffn_jax.train.metrics_log import MetricLogger, Progress
from vffn_jax.train.optimizer import init_train_state, make_optimizer, opt_state_shardings
from vffn_jax.train.step import make_train_step
from vffn_jax.train.task_eval import TaskEval, suite_from_config


def say(is_main: bool, text: str) -> None:
    if is_main:
        print(f"vffn_jax: {text}", flush=True)


@dataclasses.dataclass
class Run:
    """A run ready to loop: its state after restore, the data, the compiled steps and the actions."""

    cfg: Config
    workdir: Any
    is_main: bool
    mesh: Any
    start: int  # the step restored (0 for a fresh run)
    state: LoopState
    data_it: Any  # the checkpointable training iterator (local rows of each global batch)
    train_step: Callable
    run_eval: Callable[[Any], dict]  # held-out metrics of some params
    log: Callable[[int, dict], None]  # one metrics row (metrics.jsonl, TensorBoard, W&B)
    clock: goodput.Goodput
    guard: DivergenceGuard
    actions: list[Action]
    info: dict[str, Any]  # placement.describe: parameter counts, FLOPs, mesh
    checkpoint_dir: str


def build_run(cfg: Config, workdir, *, devices=None, progress: bool = True, stop_at: int | None = None) -> Run:
    from vffn_jax.data import batches as data_lib  # tfds/grain import lazily: dry runs and eval-only imports stay light
    from vffn_jax.data.tokenizer import check_model_fits, load_tokenizer

    clock = goodput.Goodput()  # wall time since the process started, by bucket (perf/ fields of the metrics rows)
    is_main = jax.process_index() == 0
    # checks of this host before anything is written: the kernels against its devices, wandb, the compile cache
    validate(cfg, platform=(list(devices) if devices is not None else jax.devices())[0].platform)
    wandb_log.check_installed(cfg.run.wandb if is_main else "")
    compile_cache.check(cfg.run.compile_cache)
    workdir = RunDir.at(workdir).prepare(cfg, is_main).path
    compile_cache.enable(cfg.run.compile_cache, workdir)
    s = setup(cfg, devices)
    if data_lib.uses_manifest(cfg.data):  # a pre-tokenised corpus: its tokenizer must be the run's
        data_lib.check_corpus(cfg.data, cfg.model.vocab_size)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_model_fits(tokenizer, cfg.model, source=f"data.tokenizer={cfg.data.tokenizer!r}")
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
    start, params, opt_state, init_info = _restore_or_init(cfg, s, tx, manager, abstract_opt, opt_shardings, data_it,
                                                           clock, workdir, is_main)
    train_step = make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_shardings)
    eval_step = make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)
    info = describe(s)
    logger = MetricLogger(workdir, enabled=is_main, resume_step=start)
    if is_main and cfg.run.wandb:  # every row logged below goes to W&B too
        logger.sinks.append(wandb_log.start(cfg, workdir, info=info, log=lambda text: say(True, text)))
    if init_info:
        logger.log(0, init_info)
    say(is_main, f"{cfg.scale}/{cfg.variant} ffn={cfg.model.ffn} params={info['params_total']:,} "
                 f"mesh={info['mesh']} steps {start}->{cfg.train.steps} workdir={workdir}")

    def run_eval(p):
        return evaluate(eval_step, p, eval_data, s.mesh)

    bar = Progress(total=cfg.train.steps, initial=start, enabled=is_main and progress)
    metrics_log = MetricsLog(logger, bar, every=cfg.run.log_every,
                             tokens_per_step=cfg.train.batch_size * cfg.train.seq_len,
                             flops_per_token=info["flops_per_token_train"], n_devices=s.mesh.devices.size,
                             summarize=window_summary, clock=clock, peak_flops=cfg.run.peak_flops)
    # Order matters three times: `observe` runs in this order after each step, `on_error` too (a lost peer ends
    # the process before anything waits on it), `close` in the reverse one (the checkpoint commits before the
    # preemption watch and the logs close).
    actions: list[Action] = [
        PeerWatch(workdir),
        Heartbeat(),
        metrics_log,
        PreemptionWatch(),
        Checkpointer(manager, data_it, every=cfg.run.ckpt_every, minutes=cfg.run.ckpt_minutes,
                     check_every=cfg.run.log_every),
        PeriodicEval(run_eval, logger.log, every=cfg.run.eval_every, total_steps=cfg.train.steps,
                     on_done=metrics_log.restart_clock),
    ]
    if task_suite:
        actions.append(TaskEval(task_suite, logger.log, every=cfg.run.tasks_every, total_steps=cfg.train.steps,
                                say=lambda text: say(is_main, text), on_done=metrics_log.restart_clock))
    window = parse_profile_steps(cfg.run.profile_steps)
    if window and window[1] > start:
        actions.append(Profiler(*window, workdir, start_step=start))
    state = LoopState(step=start, end=min(cfg.train.steps, stop_at) if stop_at else cfg.train.steps,
                      params=params, opt_state=opt_state, last_saved=start)
    return Run(cfg=cfg, workdir=workdir, is_main=is_main, mesh=s.mesh, start=start, state=state, data_it=data_it,
               train_step=train_step, run_eval=run_eval, log=logger.log, clock=clock, guard=DivergenceGuard(),
               actions=actions, info=info, checkpoint_dir=str(ckpt.checkpoint_dir(workdir)))


def _restore_or_init(cfg, s, tx, manager, abstract_opt, opt_shardings, data_it, clock, workdir, is_main):
    """(start step, params, opt_state, the step-0 metrics row of `--init-from` or None): the newest intact
    checkpoint of this run, else `train.init_from`'s params, else a fresh initialisation."""
    with clock("restore"):
        resumed = ckpt.resume_state(manager, ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings),
                                    ckpt.abstract_with_shardings(abstract_opt, opt_shardings), data_it,
                                    log=lambda text: say(is_main, text.removeprefix("vffn_jax: ")))
    if resumed is not None:
        start, params, opt_state = resumed
        if cfg.train.init_from:
            say(is_main, f"{workdir} has checkpoints: resuming at step {start}, train.init_from ignored")
        return start, params, opt_state, None
    if cfg.train.init_from:
        with clock("restore"):
            params, opt_state, init_info = init_from_checkpoint(s, tx, opt_shardings, cfg.train.init_from,
                                                                cfg.train.init_step)
        return 0, params, opt_state, init_info
    params, opt_state = init_train_state(s, tx, opt_shardings)
    return 0, params, opt_state, None
