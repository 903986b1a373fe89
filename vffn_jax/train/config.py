"""The training sections: `train.*` (optimisation, the Gumbel schedule, continued pretraining) and `run.*`
(checkpointing, logging, evaluation cadence and the loop's other periodic actions), each with its own validation.
Imports nothing of vffn_jax but the error types."""
from __future__ import annotations

import dataclasses
import math
import re

from vffn_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation (docs/method.md defaults) and the training loop."""

    steps: int = 1000
    batch_size: int = 384  # global batch, in sequences
    # gradient accumulation: each global batch runs as this many microbatches in sequence (lax.scan),
    # gradients averaged before one optimizer update; activation memory is that of one microbatch.
    # batch_size must be a multiple of grad_accum x the data-parallel size (mesh.data*mesh.fsdp)
    grad_accum: int = 1
    # with grad_accum > 1: the Switch balance loss's gradient uses the whole batch's expert load f (exactly
    # the one-batch update) at the cost of one extra forward pass over the batch; off: each microbatch's f
    grad_accum_exact_balance: bool = False
    seq_len: int = 4096
    lr: float = 5e-4  # peak learning rate
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1  # cosine decays to this fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norm scales
    grad_clip: float = 1.0
    # Gumbel temperature tau(step) = max(tau_start * decay**step, tau_end) (`tau_at`). The per-step decay is
    # tau_decay when > 0 (an explicit factor, e.g. the paper's 0.99984); with tau_decay = 0 (default) it is
    # derived from the run length so that tau reaches tau_end at step tau_decay_frac * steps:
    # decay = (tau_end / tau_start) ** (1 / (tau_decay_frac * steps)). The default 0.96 is where the paper's
    # schedule (decay 0.99984: the floor after 24,448 steps) reaches the floor in its main run (354m, 25,431 steps)
    tau_start: float = 5.0
    tau_decay: float = 0.0
    tau_decay_frac: float = 0.96
    tau_end: float = 0.1
    balance_coef: float = 1e-5  # Switch load-balance loss on the virtual-expert router
    z_loss_coef: float = 0.0  # router z-loss (off by default)
    seed: int = 0
    # continued pretraining (docs/method.md): start from another run's params (a workdir, its checkpoints/ or
    # checkpoints/<step>); shared weights copied, new ones (routers, experts) fresh, optimizer and step reset.
    # Ignored when this run's workdir already has checkpoints (it resumes).
    init_from: str = ""
    init_step: int = -1  # the source's checkpoint step (-1 = its latest)

    def validate(self) -> None:
        """ConfigError naming the field and the fix for an inconsistent train section."""
        t = self
        if t.steps < 1 or t.batch_size < 1 or t.seq_len < 1:
            raise ConfigError("train.steps, train.batch_size and train.seq_len must be >= 1")
        if t.grad_accum < 1 or t.batch_size % t.grad_accum:
            raise ConfigError(f"train.grad_accum={t.grad_accum} must be >= 1 and divide train.batch_size={t.batch_size} "
                              "(the global batch is split into grad_accum equal microbatches)")
        if t.init_step < -1 or (t.init_step != -1 and not t.init_from):
            raise ConfigError(f"train.init_step={t.init_step}: a checkpoint step >= 0 (or -1 = latest) of the "
                              "run named by train.init_from (--init-from DIR); set both or neither")
        if not 0 <= t.warmup_frac < 1:
            raise ConfigError(f"train.warmup_frac={t.warmup_frac} must be in [0, 1)")
        if not 0 < t.tau_end <= t.tau_start:
            raise ConfigError(f"Gumbel schedule needs 0 < train.tau_end <= train.tau_start (got tau_end={t.tau_end}, "
                              f"tau_start={t.tau_start})")
        if not 0 <= t.tau_decay <= 1:
            raise ConfigError(f"train.tau_decay={t.tau_decay} must be in (0, 1] (an explicit per-step factor) or 0 "
                              "(derive it from train.tau_decay_frac and train.steps)")
        if not 0 < t.tau_decay_frac <= 1:
            raise ConfigError(f"train.tau_decay_frac={t.tau_decay_frac} must be in (0, 1]: the fraction of train.steps "
                              "at which the Gumbel temperature reaches train.tau_end (or set an explicit "
                              "train.tau_decay per-step factor, which takes precedence)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Checkpointing, logging and evaluation cadence."""

    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    ckpt_every: int = 100
    ckpt_minutes: float = 0.0  # also save when this many minutes passed since the last save (0 = off)
    hang_minutes: float = 0.0  # no step finished for this long: dump stacks, exit 86 (0 = off; train/watchdog.py)
    hang_startup_minutes: float = 0.0  # with hang_minutes: the allowance until the first step (0 = hang_minutes)
    keep_ckpts: int = 3
    async_checkpointing: bool = True
    # JAX's persistent compilation cache: "auto" = <workdir>/compile_cache unless one is configured
    # (JAX_COMPILATION_CACHE_DIR), "off", or a folder (local or gs://)
    compile_cache: str = "auto"
    profile_steps: str = ""  # "A:B": a jax.profiler trace of steps A..B into <workdir>/tb (--profile-steps)
    tasks: str = ""  # in-loop zero-shot tasks: "" off, "all" or "piqa,arc_easy,..." (train/task_eval.py; checked at start-up)
    tasks_every: int = 0  # score run.tasks every this many steps (0 = only at the last step)
    tasks_limit: int = 0  # questions per task (0 = all; the first N, as eval.py --limit N)
    wandb: str = ""  # "PROJECT" or "PROJECT/ENTITY": also log to Weights & Biases (process 0; requirements-wandb.txt)
    peak_flops: float = 0.0  # FLOP/s per device for MFU: 0 = perf/flops.py's table (none on CPU), -1 = measure a matmul

    def validate(self) -> None:
        """ConfigError naming the field and the fix for an inconsistent run section."""
        run = self
        if run.ckpt_every < 1 or run.keep_ckpts < 1 or run.log_every < 1:
            raise ConfigError("run.ckpt_every, run.keep_ckpts and run.log_every must be >= 1")
        for key in ("ckpt_minutes", "hang_minutes", "hang_startup_minutes"):
            if getattr(run, key) < 0:
                raise ConfigError(f"run.{key}={getattr(run, key)} must be >= 0 (0 turns it off)")
        if run.tasks_every < 0 or run.tasks_limit < 0:
            raise ConfigError(f"run.tasks_every={run.tasks_every} and run.tasks_limit={run.tasks_limit} must be >= 0 "
                              "(tasks_every 0 = only at the last step; tasks_limit 0 = every question)")
        if run.profile_steps and not re.fullmatch(r"\d+(:\d+)?", run.profile_steps):
            raise ConfigError(f"run.profile_steps={run.profile_steps!r}: expected A:B, the first and last steps "
                              "to trace (e.g. 10:12)")
        if run.profile_steps:
            first, _, last = run.profile_steps.partition(":")
            if not 1 <= int(first) <= int(last or first):
                raise ConfigError(f"run.profile_steps={run.profile_steps!r}: need 1 <= A <= B")
        if run.wandb and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", run.wandb):
            raise ConfigError(f"run.wandb={run.wandb!r}: expected PROJECT or PROJECT/ENTITY (letters, digits, . _ -)")
        if run.peak_flops < 0 and run.peak_flops != -1:
            raise ConfigError(f"run.peak_flops={run.peak_flops}: FLOP/s per device, 0 (the table) or -1 (measure)")
        if not run.compile_cache:
            raise ConfigError('run.compile_cache is empty: use "auto", "off" or a folder')


def tau_decay_per_step(train: TrainConfig) -> float:
    """The per-step factor of the Gumbel schedule: `train.tau_decay` when set (> 0), else the factor that
    reaches `tau_end` at step `tau_decay_frac * steps` (1.0, a constant tau, when tau_end == tau_start)."""
    if train.tau_decay > 0:
        return train.tau_decay
    return (train.tau_end / train.tau_start) ** (1.0 / (train.tau_decay_frac * train.steps))


def tau_at(step, train: TrainConfig):
    """Gumbel temperature as a pure function of the step (works on ints and traced arrays)."""
    import jax.numpy as jnp

    # in float64: decay**step in float32 drifts by ~1e-5 per 1k steps
    log_decay = math.log(tau_decay_per_step(train))
    return jnp.maximum(train.tau_start * jnp.exp(jnp.asarray(step, jnp.float32) * log_decay), train.tau_end)
