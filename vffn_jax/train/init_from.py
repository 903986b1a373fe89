"""Continued pretraining (docs/method.md): a fresh train state whose weights come from another run."""
from __future__ import annotations

from typing import Any

import jax
import optax

from vffn_jax import storage
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.config import ConfigError, ModelConfig, config_from_dict
from vffn_jax.model.placement import Setup, abstract_model, init_params, param_name
from vffn_jax.parallel import sharding as shd
from vffn_jax.rundir import RunDir


# --------------------------------------------------------------------------- continued pretraining (docs/method.md)

# must match between source and run (kv_heads: the effective model.n_kv_heads, 0 meaning n_heads)
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "d_ff", "tie_embeddings")
# not shapes, but the copied weights were trained with them (e.g. an imported Llama's RoPE): changing them would
# silently change the model
MATH_FIELDS = ("rope_theta", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
               "rope_original_max_len", "norm_eps")


def resolve_init_source(source, step: int = -1) -> tuple[Any, int]:
    """(source run directory, checkpoint step) for `train.init_from`: a workdir written by train.py,
    its `checkpoints/` folder or one `checkpoints/<step>` folder; `step=-1` is the latest."""
    path = storage.check_readable(source, "train.init_from")
    if path.name.isdigit() and path.parent.name == RunDir.CHECKPOINTS:
        if step not in (-1, int(path.name)):
            raise ConfigError(f"train.init_from={source} names step {path.name} but train.init_step={step}; drop one")
        path, step = path.parent.parent, int(path.name)
    elif path.name == RunDir.CHECKPOINTS and not RunDir.at(path).checkpoints.exists():
        path = path.parent
    if not RunDir.at(path).has_config():
        raise ConfigError(f"train.init_from={source}: {path} has no config.json; point --init-from at a run "
                          "directory written by train.py (it holds config.json and checkpoints/)")
    steps = ckpt.all_steps(path)
    if not steps:
        raise ConfigError(f"train.init_from={source}: {path} has no checkpoints to initialise from")
    if step == -1:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"train.init_step={step} is not a checkpoint of {path}; available steps: {steps}")
    return path, step


def check_init_compatible(source: ModelConfig, model: ModelConfig, where: Any) -> None:
    """Raises ConfigError naming the first shape field (or RoPE / norm setting) that differs between the source
    run and this one."""
    math_fields = MATH_FIELDS if source.rope_scaling != "none" else MATH_FIELDS[:2] + MATH_FIELDS[-1:]
    for name in SHAPE_FIELDS + math_fields:
        a, b = getattr(source, name), getattr(model, name)
        if a != b:
            name = "n_kv_heads" if name == "kv_heads" else name
            raise ConfigError(
                f"train.init_from={where}: model.{name} differs (source {a}, this run {b}); continued pretraining "
                f"keeps the source's shapes, RoPE and norm: set --set model.{name}={a} (or --config SOURCE/config.json) "
                "or initialise from another run")


def init_from_checkpoint(s: Setup, tx: optax.GradientTransformation, opt_shardings, source,
                         step: int = -1):
    """Fresh train state for continued pretraining from another run's checkpoint (any variant).

    Restores only the source's `params` item, built from its own config.json, into this mesh's
    shardings; every parameter of this model whose name and shape exist there is copied (attention,
    norms, embeddings, the FFN's weights), the others (new routers, moe experts) keep this model's
    own initialisation with `train.seed`. The optimizer state is fresh; the caller starts at step 0
    with a fresh data iterator. Returns `(params, opt_state, info)`; `info` names what was copied.
    """
    src_dir, step = resolve_init_source(source, step)
    src_cfg = config_from_dict({"model": RunDir.at(src_dir).read_config_dict()["model"]})  # shapes only
    check_init_compatible(src_cfg.model, s.cfg.model, source)
    _, src_abstract = abstract_model(src_cfg.model)
    src_params, _ = ckpt.restore(ckpt.make_manager(src_dir, read_only=True), step,
                                 ckpt.abstract_with_shardings(src_abstract, shd.state_shardings(src_abstract, s.mesh)))
    by_name = {param_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(src_params)[0]}
    _, fresh, _ = init_params(s.cfg.model, s.mesh, s.cfg.train.seed)
    copied, new = [], []

    def pick(path, leaf):
        name, src = param_name(path), by_name.get(param_name(path))
        if src is not None and src.shape == leaf.shape:
            copied.append(name)
            return src.astype(leaf.dtype)
        new.append(name)
        return leaf

    params = jax.device_put(jax.tree_util.tree_map_with_path(pick, fresh), s.param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    info = {"init_from": str(src_dir), "init_from_step": step, "init_from_ffn": src_cfg.model.ffn,
            "init_copied": copied, "init_fresh": new, "init_dropped": sorted(set(by_name) - set(copied))}
    if jax.process_index() == 0:
        print(f"vffn_jax: initialised from {src_dir} step {step} (ffn={src_cfg.model.ffn}): {len(copied)} parameters "
              f"copied, fresh: {new or 'none'}, not used: {info['init_dropped'] or 'none'}; optimizer and step reset",
              flush=True)
    return params, opt_state, info
