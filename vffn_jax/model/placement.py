"""Abstract-first model construction and placement on the mesh (shared by train, eval, inference).

`abstract_model` builds the NNX graph with `nnx.eval_shape` (no weight is materialised); `setup` makes
the mesh and every parameter's sharding from the one logical-axis rules table; `init_params` then
writes each shard in place with a jitted init. `describe` is what `train.py --dry-run` prints.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from vffn_jax.config import Config, ModelConfig, validate
from vffn_jax.model.transformer import Transformer
from vffn_jax.parallel import sharding as shd
from vffn_jax.perf import flops as flops_lib


# --------------------------------------------------------------------------- model state


def abstract_model(model_cfg: ModelConfig, seed: int = 0):
    """(graphdef, abstract params) without materialising any weight."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(seed))))


def init_params(model_cfg: ModelConfig, mesh, seed: int = 0):
    """Abstract-first init: eval_shape -> shardings -> jitted init that writes each shard in place."""
    graphdef, init, shardings = _jitted_init(model_cfg, mesh, seed)
    return graphdef, init(), shardings


@functools.lru_cache(maxsize=8)  # a second run of the same model on the same mesh re-uses the compiled init
def _jitted_init(model_cfg: ModelConfig, mesh, seed: int):
    graphdef, abstract = abstract_model(model_cfg, seed)
    shardings = shd.state_shardings(abstract, mesh)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(Transformer(model_cfg, nnx.Rngs(seed)))

    return graphdef, init, shardings


# --------------------------------------------------------------------------- set-up shared by train and eval


@dataclasses.dataclass
class Setup:
    cfg: Config
    mesh: Any
    graphdef: Any
    abstract_params: Any
    param_shardings: Any


def setup(cfg: Config, devices=None) -> Setup:
    devices = devices if devices is not None else jax.devices()
    validate(cfg, n_devices=len(devices), n_slices=shd.mesh_slices(cfg.mesh, devices))
    mesh = shd.make_mesh(cfg.mesh, devices)
    graphdef, abstract = abstract_model(cfg.model, cfg.train.seed)
    return Setup(cfg, mesh, graphdef, abstract, shd.state_shardings(abstract, mesh))


param_name = shd.param_name  # re-exported: tests and tools name parameters this way


def describe(s: Setup) -> dict[str, Any]:
    """What `--dry-run` prints: parameter counts, FLOPs per token, mesh and every parameter's sharding."""
    cfg = s.cfg
    counts = flops_lib.count_params(s.abstract_params)
    report = shd.sharding_report(s.abstract_params, s.param_shardings)
    inference = flops_lib.inference_flops(cfg.model, cfg.train.seq_len)  # depth assumed uniform over 1..L
    return {
        "scale": cfg.scale, "variant": cfg.variant, "ffn": cfg.model.ffn,
        **counts,
        "params_analytic": flops_lib.analytic_params(cfg.model),
        "flops_per_token_train": flops_lib.flops_per_token(cfg.model, cfg.train.seq_len, train=True),
        **flops_lib.inference_flops_fields(inference),
        "inference_depth_assumed": inference["depth_ideal"],  # None without a depth router
        "inference_executed_depth_assumed": inference["depth_executed"],
        "tokens_per_batch": cfg.train.batch_size * cfg.train.seq_len,
        "mesh": dict(zip(s.mesh.axis_names, (int(x) for x in s.mesh.devices.shape))),
        "devices": f"{s.mesh.devices.size} x {s.mesh.devices.flat[0].device_kind}",
        "shardings": report["params"],
        "param_bytes_per_device": report["bytes_per_device"],
        "replicated_param_fraction": report["replicated_fraction"],
        "redundant_param_fraction": report["redundant_fraction"],
    }
