"""vffn_jax parameters <-> Hugging Face Llama tensor names and layouts, both ways.

vffn_jax stores every layer's weights stacked on a leading `layers` axis, attention kernels as
`[d, heads, head_dim]` and FFN kernels as `[in, out]`; transformers stores one tensor per layer and
`nn.Linear` weights as `[out, in]`. RoPE uses the same rotate-half layout on both sides, so every
mapping is a reshape plus a transpose, never a permutation of rows. The VersatileFFN routers (and moe's
real experts) have no Llama counterpart: they travel under `mlp.*` names that the exported modeling
code (`hf/modeling/modeling_vffn.py`) reads.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from vffn_jax.config import ConfigError, ModelConfig

MOE_EXPERT_WEIGHTS = ("expert_w_gate", "expert_w_up", "expert_w_down")  # kept in vffn_jax's own [E, in, out] layout


def _ffn_extras(m: ModelConfig) -> list[str]:
    from vffn_jax.model.ffn import param_shapes

    return [k for k in param_shapes(m.ffn, m.d_model, m.d_ff, m.n_experts, m.max_depth)
            if k not in ("norm_scale", "w_gate", "w_up", "w_down")]


def _layer_tensors(m: ModelConfig) -> dict[str, tuple[tuple[str, ...], Callable, Callable, tuple[int, ...]]]:
    """HF per-layer suffix -> (our key path, ours->HF, HF->ours, HF shape)."""
    d, n, k, h, f = m.d_model, m.n_heads, m.kv_heads, m.head_dim, m.d_ff
    linear_in = lambda out_shape: (lambda w: w.reshape(d, -1).T, lambda w: w.T.reshape(d, *out_shape))
    table = {
        "input_layernorm.weight": (("attn_norm",), lambda w: w, lambda w: w, (d,)),
        "self_attn.q_proj.weight": (("attn", "w_q"), *linear_in((n, h)), (n * h, d)),
        "self_attn.k_proj.weight": (("attn", "w_k"), *linear_in((k, h)), (k * h, d)),
        "self_attn.v_proj.weight": (("attn", "w_v"), *linear_in((k, h)), (k * h, d)),
        "self_attn.o_proj.weight": (("attn", "w_o"), lambda w: w.reshape(n * h, d).T, lambda w: w.T.reshape(n, h, d),
                                    (d, n * h)),
        "post_attention_layernorm.weight": (("ffn", "norm_scale"), lambda w: w, lambda w: w, (d,)),
        "mlp.gate_proj.weight": (("ffn", "w_gate"), lambda w: w.T, lambda w: w.T, (f, d)),
        "mlp.up_proj.weight": (("ffn", "w_up"), lambda w: w.T, lambda w: w.T, (f, d)),
        "mlp.down_proj.weight": (("ffn", "w_down"), lambda w: w.T, lambda w: w.T, (d, f)),
    }
    extras = _ffn_extras(m)
    if "expert_router" in extras:
        table["mlp.expert_router.weight"] = (("ffn", "expert_router"), lambda w: w.T, lambda w: w.T, (m.n_experts, d))
    if "depth_router" in extras:
        table["mlp.depth_router.weight"] = (("ffn", "depth_router"), lambda w: w.T, lambda w: w.T, (m.max_depth, d))
    e, fe = m.n_experts, m.d_ff // max(m.n_experts, 1)
    moe_shapes = {"expert_w_gate": (e, d, fe), "expert_w_up": (e, d, fe), "expert_w_down": (e, fe, d)}
    for name in MOE_EXPERT_WEIGHTS:
        if name in extras:
            table[f"mlp.{name}"] = (("ffn", name), lambda w: w, lambda w: w, moe_shapes[name])
    return table


def _top_tensors(m: ModelConfig) -> dict[str, tuple[str, Callable, Callable, tuple[int, ...]]]:
    table = {
        "model.embed_tokens.weight": ("embed", lambda w: w, lambda w: w, (m.vocab_size, m.d_model)),
        "model.norm.weight": ("final_norm", lambda w: w, lambda w: w, (m.d_model,)),
    }
    if not m.tie_embeddings:
        table["lm_head.weight"] = ("lm_head", lambda w: w.T, lambda w: w.T, (m.vocab_size, m.d_model))
    return table


def expected_names(m: ModelConfig) -> list[str]:
    """Every HF tensor name the model `m` has, in a stable order."""
    names = list(_top_tensors(m))
    for i in range(m.n_layers):
        names += [f"model.layers.{i}.{s}" for s in _layer_tensors(m)]
    return names


def hf_tensors(m: ModelConfig, params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array in HF layout) for every parameter of `params` (vffn_jax's nested dict, or an
    `nnx.State`), one tensor at a time so a caller can write them out without holding two copies."""
    from vffn_jax.model.kv_cache import pure_params

    params = pure_params(params)
    for name, (key, to_hf, _, _) in _top_tensors(m).items():
        yield name, np.ascontiguousarray(to_hf(np.asarray(params[key])))
    layers = params["layers"]
    for suffix, (path, to_hf, _, _) in _layer_tensors(m).items():
        stacked = layers
        for part in path:
            stacked = stacked[part]
        stacked = np.asarray(stacked)
        for i in range(m.n_layers):
            yield f"model.layers.{i}.{suffix}", np.ascontiguousarray(to_hf(stacked[i]))


def params_from_hf(m: ModelConfig, read: Callable[[str], np.ndarray], names: set[str] | None = None) -> dict:
    """vffn_jax's nested params dict from HF tensors: `read(name)` returns one tensor (host array).

    `names` (the tensors the checkpoint holds) is checked first: a missing tensor is a ConfigError naming it,
    as is a tensor whose shape differs from what `m` implies. Tensors in `names` that `m` does not use are
    the caller's to refuse or ignore (e.g. a tied checkpoint that still stores `lm_head.weight`)."""
    if names is not None:
        missing = [n for n in expected_names(m) if n not in names]
        if missing:
            raise ConfigError(f"the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing), which the "
                              f"config implies (model.ffn={m.ffn}, tie_embeddings={m.tie_embeddings}); the weights "
                              "do not belong to this config.json")

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        w = read(name)
        if tuple(w.shape) != tuple(shape):
            raise ConfigError(f"tensor {name!r} has shape {tuple(w.shape)} but the config implies {tuple(shape)}; "
                              "config.json and the weights disagree")
        return w

    out: dict = {}
    for name, (key, _, from_hf, shape) in _top_tensors(m).items():
        out[key] = from_hf(get(name, shape))
    layers: dict = {}
    for suffix, (path, _, from_hf, shape) in _layer_tensors(m).items():
        stacked = np.stack([from_hf(get(f"model.layers.{i}.{suffix}", shape)) for i in range(m.n_layers)])
        node = layers
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = stacked
    out["layers"] = layers
    return out
