"""The one tiny shape the tests share, so that compiled programs are reused across tests (the train and eval
steps are memoised on the model and training sections, and the persistent compile cache holds the rest).

A test that does not need another shape uses these; one that does says why next to its own overrides.
"""
from __future__ import annotations

from vffn_jax.config import Config, ModelConfig, load_config

# The training shape: the `tiny` preset cut to 2 layers of width 64 (byte tokenizer, vocab 384), batch 8 x 32.
TINY_MODEL = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2, "model.d_ff": 128}
TINY_TRAIN = {**TINY_MODEL, "train.batch_size": 8, "train.seq_len": 32, "train.steps": 4, "run.log_every": 1,
              "run.ckpt_every": 2, "run.eval_every": 0, "run.eval_batches": 2}

# The model shape of the model-level unit tests (no training loop, no tokenizer): small enough that every FFN
# kind and attention kernel compiles in about a second, with the routing the method needs (4 experts, top-2,
# up to 4 loops).
SMALL_MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, n_experts=4, top_k=2, max_depth=4,
                   n_loops=3, init_std=0.2)


def tiny_config(variant: str = "versatile", overrides: dict | None = None, **more) -> Config:
    """`load_config("tiny", variant)` at the shared tiny training shape, plus `overrides` (dotted keys)."""
    return load_config("tiny", variant, {**TINY_TRAIN, **(overrides or {}), **more})


def tiny_args(overrides: dict | None = None) -> list[str]:
    """The shared tiny training shape as `--config tiny --set KEY=VALUE ...` command-line arguments."""
    args = ["--config", "tiny"]
    for key, value in {**TINY_TRAIN, **(overrides or {})}.items():
        args += ["--set", f"{key}={value}"]
    return args


def small_model(ffn: str = "versatile", **kw) -> ModelConfig:
    """The model-level unit tests' ModelConfig (`SMALL_MODEL`), with `ffn` and any field overridden."""
    return ModelConfig(**{**SMALL_MODEL, "ffn": ffn, **kw})


# The inference shape: a freshly initialised tiny versatile model, 2 layers of width 32, large init so routing varies.
INFERENCE_MODEL = {"model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2, "model.d_ff": 64, "model.init_std": 0.2}


def write_params_only_run(workdir, *, context: int = 48, step: int = 3):
    """A params-only run (no optimizer or data state) of the inference shape with `context` positions, at `step`:
    what generation, export, lm-eval and serving read. Returns `workdir`."""
    from vffn_jax.checkpoint.export import write_params_run
    from vffn_jax.model import placement
    from vffn_jax.parallel import sharding as shd

    cfg = load_config("tiny", "versatile", {**INFERENCE_MODEL, "train.seq_len": context, "train.batch_size": 8,
                                             "run.async_checkpointing": False})
    _, params, _ = placement.init_params(cfg.model, shd.make_mesh(cfg.mesh), cfg.train.seed)
    write_params_run(workdir, cfg, step, params)
    return workdir
