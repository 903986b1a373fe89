"""A study's runs: one RunSpec (config + run directory) per regime x variant x seed."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any
from vffn_jax import storage
from vffn_jax import config as config_lib
from vffn_jax.config import Config, ConfigError
from vffn_jax.study.corpus import _sha
from vffn_jax.study.presets import PRESETS, Preset, REGIMES, VARIANTS, continued_shuffle_seed


# --------------------------------------------------------------------------- run plan


@dataclasses.dataclass
class RunSpec:
    regime: str  # "base" | "scratch" | "continued"
    variant: str
    seed: int
    cfg: Config
    workdir: Path
    width: int | None = None  # the budget study's grid point (d_model, tokens/param as asked)
    tpp: float | None = None


def local_work_dir(out) -> Path:
    """Where the study keeps its corpus and token cache: inside `out` when it is local, else in the
    local cache root (a gs:// study writes run outputs to the bucket but tokenises on this machine)."""
    from vffn_jax.data.cache_dir import cache_root

    if not storage.is_gcs(out):
        return Path(os.fspath(storage.as_path(out)))
    return cache_root() / "study" / _sha(str(out))[:16]


def study_overrides(preset: Preset, out, steps: int | None, user: dict[str, Any],
                    corpus: tuple[Path, float] | None, scale_steps: int) -> dict[str, Any]:
    over: dict[str, Any] = dict(preset.overrides)
    if corpus is not None:
        over.update({"data.path": str(corpus[0]), "data.holdout_fraction": corpus[1],
                     "data.tokenizer": preset.tokenizer,
                     "data.cache_dir": str(local_work_dir(out) / "cache")})
    over.update(user)
    n = steps or int(over.get("train.steps", scale_steps))
    over["train.steps"] = n
    if preset.quiet_runs:
        over.update({"run.eval_every": 0, "run.ckpt_every": n, "run.keep_ckpts": 1})
    return over


def plan(preset_name: str, out, *, seeds: int = 3, variants: list[str] | None = None,
         regimes: list[str] | None = None, steps: int | None = None, user_overrides: dict[str, Any] | None = None,
         corpus: tuple[Path, float] | None = None) -> list[RunSpec]:
    """Every run of the study, dense_base first (when the continued regime is on)."""
    preset = PRESETS[preset_name]
    if preset.grid is not None:
        raise ConfigError(f"preset {preset_name!r} is a budget study: use plan_budget")
    variants = list(preset.variants or VARIANTS) if variants is None else variants
    regimes = list(REGIMES) if regimes is None else regimes
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"--variants: unknown variant {v!r}; choose from {list(VARIANTS)}")
    for r in regimes:
        if r not in REGIMES:
            raise ConfigError(f"--regimes: unknown regime {r!r}; choose from {list(REGIMES)}")
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    scale_steps = config_lib.load_config(preset.scale, "dense").train.steps
    out = storage.as_path(out)
    over = study_overrides(preset, out, steps, user_overrides or {}, corpus, scale_steps)

    def make(regime: str, variant: str, seed: int, workdir, init_from: str = "") -> RunSpec:
        preset_variant, extra = VARIANTS[variant]
        o = {**over, **extra, "train.seed": seed, "data.shuffle_seed": seed}
        if init_from:  # the continuation stage: its own data order (the base run's shuffle seed would replay it)
            o["train.init_from"] = init_from
            o["data.shuffle_seed"] = continued_shuffle_seed(seed)
        cfg = config_lib.load_config(preset.scale, preset_variant, o)
        cfg = dataclasses.replace(cfg, variant=variant)
        return RunSpec(regime, variant, seed, cfg, workdir)

    runs = []
    base = out / "dense_base"
    if "continued" in regimes:
        runs.append(make("base", "dense", 0, base))
    for regime in regimes:
        for variant in variants:
            for seed in range(seeds):
                runs.append(make(regime, variant, seed, out / regime / variant / f"seed{seed}",
                                 str(base) if regime == "continued" else ""))
    return runs
