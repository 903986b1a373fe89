"""Parameter counts, analytic FLOPs per token (matmuls only) and MFU.

Conventions: a matmul of [m,k]x[k,n] costs 2mkn; training = 3x forward (backward = 2x forward;
rematerialisation is not counted, as in the usual MFU definition). Attention scores count the
full T x T product (PaLM's convention). Training counts what runs: every depth loop (all L), the
width path as a dense masked down-projection (+2df; `width_shared` folds its routed experts into
its one down-projection, so +0), routers. `moe` counts its k routed experts of E (the model FLOPs a
sparse dispatch runs, 1.25x dense for 8-choose-2) although the dense dispatch here executes all E
(2x dense), so its MFU is model-FLOPs utilisation.

Inference FLOPs per token are reported three ways (`inference_flops`), because the depth-routed
variants do not run the same work per token:

  ideal     each token at its own depth: the loops counted are the mean over tokens (and layers) of
            the token's own argmax depth; the rest as training counts it (width path's down-projection
            for every token, moe's k of E experts). `flops_per_token(train=False, mean_depth=...)`.
  executed  what the compiled inference program ran: the FFN's `executed_loops` per token (model.depth_exec:
            compact runs each loop on the tokens that need it, in blocks, padding counted; masked runs the
            whole batch to its deepest token), averaged over layers and batches; moe's dense dispatch runs
            all E experts (2x dense FFN). Equal to ideal for the variants without a depth router (except moe).
  paper     the paper's convention (its Table 2, docs/method.md "FFN compute vs dense"): FFN matmuls only (no
            attention, embeddings or routers), forward, with sparse experts: a virtual or real expert costs
            its f/E hidden units' gate/up/down (k/E of a dense FFN per token for k experts), and VersatileFFN's
            width path counts only for the tokens that use it (alpha > 0, i.e. depth < L). Per layer, in
            dense-FFN units (6df): dense 1, kloop K, width_only k/E, width_shared 1 + k/E,
            depth_only E[depth], versatile E[depth] + (k/E) P(depth < L), versatile_avg E[depth] + k/E,
            moe 1 + k/E. `paper_ffn_vs_dense` is that multiplier; `paper` = n_layers * 6df * multiplier.

Without a measurement (the dry run) depth is assumed uniform over 1..L: ideal at (L+1)/2 loops, executed at
L (a batch of many tokens almost surely holds one of depth L), P(depth < L) = (L-1)/L.
"""
from __future__ import annotations

import math

import jax

from vffn_jax.config import ModelConfig
from vffn_jax.perf.chips import chip_for

def peak_flops_per_device(device=None, override: float = 0.0) -> float | None:
    """`override` when > 0, else the chip table's peak for the device (None on CPUs: MFU is not reported)."""
    if override > 0:
        return override
    chip = chip_for((device or jax.devices()[0]).device_kind)
    return chip.peak_flops if chip else None


def count_params(abstract_state) -> dict[str, int]:
    """Exact counts from the (abstract) model state: total and without the two embedding matrices."""
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_state))
    embedding = sum(math.prod(leaf.shape) for k in ("embed", "lm_head") if k in abstract_state
                    for leaf in jax.tree.leaves(abstract_state[k]))
    return {"params_total": total, "params_non_embedding": total - embedding}


def analytic_params(cfg: ModelConfig) -> int:
    """Closed form of the parameter count (must agree with count_params; docs/method.md table)."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    per_layer = attention_params(cfg) + 3 * d * f + 2 * d + router_width(cfg) * d
    if cfg.ffn == "moe":
        per_layer += 3 * d * f  # E real experts of f/E hidden units each: E * 3 * d * f/E
    return (1 if cfg.tie_embeddings else 2) * v * d + cfg.n_layers * per_layer + d


def attention_params(cfg: ModelConfig) -> int:
    """q and o (d x d each) plus k and v over the key/value heads (grouped-query attention: fewer of them)."""
    return 2 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.kv_heads * cfg.head_dim


def router_width(cfg: ModelConfig) -> int:
    return {"width_only": cfg.n_experts, "width_shared": cfg.n_experts, "depth_only": cfg.max_depth,
            "moe": cfg.n_experts, "versatile": cfg.n_experts + cfg.max_depth,
            "versatile_avg": cfg.n_experts + cfg.max_depth}.get(cfg.ffn, 0)


DEPTH_ROUTED = ("depth_only", "versatile", "versatile_avg")


def assumed_mean_depth(cfg: ModelConfig) -> float:
    """Mean loops per token assumed without a measurement: uniform over 1..L."""
    return (cfg.max_depth + 1) / 2


def ffn_forward_flops(cfg: ModelConfig, *, train: bool, mean_depth: float | None = None,
                      all_experts: bool = False) -> float:
    """Forward FLOPs per token of one layer's FFN. `mean_depth` (1..L): the loops counted at inference
    (default `assumed_mean_depth`). `all_experts`: count moe's dense dispatch (all E experts, as executed)."""
    d, f = cfg.d_model, cfg.d_ff
    loop = 6 * d * f  # gate, up and down projections
    routers = 2 * d * router_width(cfg)
    depth = cfg.max_depth if train else (mean_depth if mean_depth is not None else assumed_mean_depth(cfg))
    loops = {"dense": 1, "kloop": cfg.n_loops, "width_only": 1, "width_shared": 1, "depth_only": depth,
             "versatile": depth, "versatile_avg": depth, "moe": 1}[cfg.ffn]
    width_down = 2 * d * f if cfg.ffn in ("versatile", "versatile_avg") else 0  # the width path's own down-projection
    experts = 0.0
    if cfg.ffn == "moe":  # k of E experts of f/E units (model FLOPs), or all E (the dense dispatch as executed)
        experts = loop if all_experts else loop * cfg.top_k / cfg.n_experts
    return loops * loop + width_down + experts + routers


def flops_per_token(cfg: ModelConfig, seq_len: int, *, train: bool, mean_depth: float | None = None,
                    all_experts: bool = False) -> float:
    """Model FLOPs per token: training (fwd+bwd) or inference (fwd) at `mean_depth` loops (the "ideal" count
    with a measured mean depth; see the module docstring)."""
    d = cfg.d_model
    attn = 2 * attention_params(cfg) + 4 * seq_len * d
    per_layer = attn + ffn_forward_flops(cfg, train=train, mean_depth=mean_depth, all_experts=all_experts)
    forward = cfg.n_layers * per_layer + 2 * d * cfg.vocab_size
    return 3 * forward if train else forward


def paper_ffn_multiplier(cfg: ModelConfig, *, mean_depth: float | None = None,
                         width_fraction: float | None = None) -> float:
    """Forward FFN compute per token per layer in dense-FFN units, the paper's convention (module docstring).
    `width_fraction`: the fraction of tokens whose width path counts (versatile: P(depth < L))."""
    sparse = cfg.top_k / cfg.n_experts
    depth = mean_depth if mean_depth is not None else assumed_mean_depth(cfg)
    if width_fraction is None:
        width_fraction = (cfg.max_depth - 1) / cfg.max_depth  # P(depth < L) with depth uniform over 1..L
    return {"dense": lambda: 1.0, "kloop": lambda: float(cfg.n_loops), "width_only": lambda: sparse,
            "width_shared": lambda: 1.0 + sparse, "depth_only": lambda: depth,
            "versatile": lambda: depth + sparse * width_fraction, "versatile_avg": lambda: depth + sparse,
            "moe": lambda: 1.0 + sparse}[cfg.ffn]()


def inference_flops(cfg: ModelConfig, seq_len: int, *, mean_depth: float | None = None,
                    executed_depth: float | None = None, width_fraction: float | None = None) -> dict[str, float]:
    """Inference FLOPs per token three ways: `ideal`, `executed` and `paper` (FFN only), see the module docstring.

    `mean_depth`: mean own depth per token (ideal); `executed_depth`: mean over layers and batches of the
    executed loops per token (executed); `width_fraction`: fraction of tokens with alpha > 0 (versatile's paper
    count). Each defaults to the uniform-depth assumption; all three are ignored by variants without a depth
    router. Returns also the depths used and `paper_ffn_vs_dense` (the paper's per-layer multiplier)."""
    routed = cfg.ffn in DEPTH_ROUTED
    own = (mean_depth if mean_depth is not None else assumed_mean_depth(cfg)) if routed else None
    run = (executed_depth if executed_depth is not None else float(cfg.max_depth)) if routed else None
    mult = paper_ffn_multiplier(cfg, mean_depth=own, width_fraction=width_fraction)
    return {
        "ideal": flops_per_token(cfg, seq_len, train=False, mean_depth=own),
        "executed": flops_per_token(cfg, seq_len, train=False, mean_depth=run, all_experts=True),
        "paper": cfg.n_layers * 6 * cfg.d_model * cfg.d_ff * mult,
        "paper_ffn_vs_dense": mult,
        "depth_ideal": own, "depth_executed": run,
    }


def inference_flops_fields(fl: dict[str, float]) -> dict[str, float]:
    """The flat result keys eval, the dry run and the study report (`flops_per_token_inference` = ideal)."""
    return {"flops_per_token_inference": fl["ideal"], "flops_per_token_inference_executed": fl["executed"],
            "flops_per_token_inference_paper": fl["paper"], "paper_ffn_vs_dense": fl["paper_ffn_vs_dense"]}


INFERENCE_FLOPS_NOTE = ("inference FLOPs/token: ideal = each token at its own depth; executed = what the batch ran "
                        "(the depth loops as model.depth_exec runs them, block padding counted; moe all E experts); paper = "
                        "the paper's Table 2 convention, FFN matmuls only with sparse experts (vffn_jax/flops.py)")


def mfu(tokens_per_second: float, flops_per_token_train: float, n_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_second * flops_per_token_train / (n_devices * peak)
