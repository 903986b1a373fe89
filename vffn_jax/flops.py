"""Parameter counts, analytic FLOPs per token (matmuls only, as executed here) and MFU.

Conventions: a matmul of [m,k]x[k,n] costs 2mkn; training = 3x forward (backward = 2x forward;
rematerialisation is not counted, as in the usual MFU definition). Attention scores count the
full T x T product (PaLM's convention). The FFN counts what this implementation runs: the width
path is a dense masked down-projection (+2df), the depth path runs every loop in training and
`depth` loops per token at inference. Exception, `moe`: its k routed experts of E are counted (the
model FLOPs a sparse dispatch runs, 1.25x dense for 8-choose-2) although the dense dispatch here
executes all E (2x dense), so its MFU is model-FLOPs utilisation.
"""
from __future__ import annotations

import math

import jax

from vffn_jax.config import ModelConfig

# Peak dense bf16 FLOP/s per device, keyed by a substring of `jax.Device.device_kind` (lower case).
PEAK_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6": 918e12,
}


def peak_flops_per_device(device=None, override: float = 0.0) -> float | None:
    if override > 0:
        return override
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, value in PEAK_FLOPS.items():
        if key in kind:
            return value
    return None  # CPUs: no meaningful peak, MFU is not reported


def count_params(abstract_state) -> dict[str, int]:
    """Exact counts from the (abstract) model state: total and without the two embedding matrices."""
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_state))
    embedding = sum(math.prod(leaf.shape) for k in ("embed", "lm_head") for leaf in jax.tree.leaves(abstract_state[k]))
    return {"params_total": total, "params_non_embedding": total - embedding}


def analytic_params(cfg: ModelConfig) -> int:
    """Closed form of the parameter count (must agree with count_params; SPEC §4 table)."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    per_layer = 4 * d * d + 3 * d * f + 2 * d + router_width(cfg) * d
    if cfg.ffn == "moe":
        per_layer += 3 * d * f  # E real experts of f/E hidden units each: E * 3 * d * f/E
    return 2 * v * d + cfg.n_layers * per_layer + d


def router_width(cfg: ModelConfig) -> int:
    return {"width_only": cfg.n_experts, "depth_only": cfg.max_depth, "moe": cfg.n_experts,
            "versatile": cfg.n_experts + cfg.max_depth, "versatile_avg": cfg.n_experts + cfg.max_depth}.get(cfg.ffn, 0)


def ffn_forward_flops(cfg: ModelConfig, *, train: bool, mean_depth: float | None = None) -> float:
    """Forward FLOPs per token of one layer's FFN. `mean_depth` (1..L) is used at inference."""
    d, f = cfg.d_model, cfg.d_ff
    loop = 6 * d * f  # gate, up and down projections
    routers = 2 * d * router_width(cfg)
    depth = cfg.max_depth if train else (mean_depth if mean_depth is not None else (cfg.max_depth + 1) / 2)
    loops = {"dense": 1, "kloop": cfg.n_loops, "width_only": 1, "depth_only": depth, "versatile": depth,
             "versatile_avg": depth, "moe": 1}[cfg.ffn]
    width_down = 2 * d * f if cfg.ffn in ("versatile", "versatile_avg") else 0  # the width path's own down-projection
    experts = loop * cfg.top_k / cfg.n_experts if cfg.ffn == "moe" else 0  # k of E experts of f/E units (model FLOPs)
    return loops * loop + width_down + experts + routers


def flops_per_token(cfg: ModelConfig, seq_len: int, *, train: bool, mean_depth: float | None = None) -> float:
    """Model FLOPs per token: training (fwd+bwd) or inference (fwd) at `mean_depth` loops."""
    d = cfg.d_model
    attn = 8 * d * d + 4 * seq_len * d
    per_layer = attn + ffn_forward_flops(cfg, train=train, mean_depth=mean_depth)
    forward = cfg.n_layers * per_layer + 2 * d * cfg.vocab_size
    return 3 * forward if train else forward


def mfu(tokens_per_second: float, flops_per_token_train: float, n_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_second * flops_per_token_train / (n_devices * peak)
