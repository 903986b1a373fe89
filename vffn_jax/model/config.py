"""The model section (`model.*`): the decoder's shape and its FFN variant, with its own validation.

Imports nothing of vffn_jax but the error types, so `vffn_jax.config` can compose it (and every module that
needs the variant facts can import them) without a cycle.
"""
from __future__ import annotations

import dataclasses

from vffn_jax.errors import ConfigError

FFN_KINDS = ("dense", "kloop", "width_only", "width_shared", "depth_only", "versatile", "versatile_avg", "moe")
EXPERT_KINDS = ("width_only", "width_shared", "versatile", "versatile_avg", "moe")  # have an expert router (top-k of E)
VIRTUAL_EXPERT_KINDS = ("width_only", "width_shared", "versatile", "versatile_avg")  # experts are slices of the shared FFN
DEPTH_KINDS = ("depth_only", "versatile", "versatile_avg")  # have a depth router (1..L loops per token)
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_KINDS = ("auto", "xla", "splash", "cudnn")  # vffn_jax/model/attention.py
CUDNN_PLATFORMS = ("gpu", "cuda")  # jax Device.platform of the devices cuDNN flash attention runs on


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the OLMo-style decoder and of its FFN (docs/method.md)."""

    vocab_size: int = 50304  # embedding rows; >= the tokenizer's vocabulary
    d_model: int = 1024
    n_layers: int = 15
    n_heads: int = 16
    n_kv_heads: int = 0  # grouped-query attention: key/value heads (0 = n_heads, multi-head attention)
    d_ff: int = 4096  # SwiGLU hidden units f
    ffn: str = "versatile"  # one of FFN_KINDS
    n_experts: int = 8  # E virtual experts (width path)
    top_k: int = 2  # k experts per token
    max_depth: int = 4  # L loops of the depth path
    n_loops: int = 4  # K for the `kloop` baseline
    rope_theta: float = 10000.0
    # RoPE frequency scaling of Llama 3.1/3.2 checkpoints: "none" | "llama3" (its factor, low/high-frequency
    # factors and the original context length, as in a HF config's rope_parameters)
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    tie_embeddings: bool = False  # the LM head reuses the input embedding matrix (no lm_head parameter)
    norm_eps: float = 1e-6
    init_std: float = 0.02
    scan_layers: bool = True  # one compiled layer body (compile time independent of n_layers)
    remat: str = "none"  # per-layer rematerialisation: none | full | dots (save matmul outputs)
    remat_loops: bool = False  # rematerialise each depth loop of the FFN as well
    # inference depth loops (docs/method.md): "compact" runs loop l only on the tokens whose depth reaches it
    # (depth-sorted, in blocks of depth_block rows); "masked" runs it on the whole batch while any token needs
    # it; "auto" = compact. Training always runs every loop (the Gumbel mixture needs them)
    depth_exec: str = "auto"
    depth_block: int = 64
    dtype: str = "float32"  # compute dtype; params stay `param_dtype`
    param_dtype: str = "float32"
    # attention kernel: auto (splash on TPU, cuDNN on GPU with bf16/fp16, XLA elsewhere) | xla | splash | cudnn
    attention: str = "auto"
    # document masking: no token attends across an EOS boundary (segment ids from eos_id; RoPE stays absolute)
    doc_mask: bool = False
    eos_id: int = -1  # the tokenizer's EOS id (byte: 256), needed by doc_mask; -1 = unset

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self) -> None:
        """ConfigError naming the field and the fix for an inconsistent model section."""
        m = self
        if m.ffn not in FFN_KINDS:
            raise ConfigError(f"model.ffn={m.ffn!r}: choose one of {FFN_KINDS}")
        if m.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={m.remat!r}: choose one of {REMAT_POLICIES}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(m, name) < 1:
                raise ConfigError(f"model.{name}={getattr(m, name)} must be >= 1")
        if m.d_model % m.n_heads:
            raise ConfigError(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; pick heads so d_model % n_heads == 0")
        if m.n_kv_heads < 0 or m.n_heads % m.kv_heads:
            raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} (each key/value "
                              "head serves n_heads/n_kv_heads query heads); 0 means n_heads")
        if m.depth_exec not in ("auto", "masked", "compact") or m.depth_block < 1:
            raise ConfigError(f"model.depth_exec={m.depth_exec!r} / model.depth_block={m.depth_block}: choose auto, "
                              "masked or compact, and a block of >= 1 rows")
        if m.rope_scaling not in ("none", "llama3"):
            raise ConfigError(f"model.rope_scaling={m.rope_scaling!r}: choose none or llama3")
        if m.rope_scaling == "llama3" and not (m.rope_factor > 0 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                                               and m.rope_original_max_len > 0):
            raise ConfigError("model.rope_scaling=llama3 needs rope_factor > 0, 0 < rope_low_freq_factor < "
                              "rope_high_freq_factor and rope_original_max_len > 0")
        if m.head_dim % 2:
            raise ConfigError(f"head dim d_model/n_heads={m.head_dim} must be even for RoPE; change model.n_heads or model.d_model")
        if m.ffn in EXPERT_KINDS:
            if m.n_experts < 1:
                raise ConfigError(f"model.n_experts={m.n_experts} must be >= 1")
            if m.d_ff % m.n_experts:
                raise ConfigError(
                    f"model.d_ff={m.d_ff} is not divisible by model.n_experts={m.n_experts} (f % E != 0); "
                    "experts are equal slices of (moe: have 1/E of) the hidden units: pick E dividing d_ff")
            if not 1 <= m.top_k <= m.n_experts:
                raise ConfigError(f"model.top_k={m.top_k} must be in 1..model.n_experts={m.n_experts}")
        if m.ffn in DEPTH_KINDS and m.max_depth < 1:
            raise ConfigError(f"model.max_depth={m.max_depth} must be >= 1 (the number of FFN loops L)")
        if m.ffn == "kloop" and m.n_loops < 1:
            raise ConfigError(f"model.n_loops={m.n_loops} must be >= 1 (K of the kloop baseline)")
        for name in ("dtype", "param_dtype"):
            if getattr(m, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.{name}={getattr(m, name)!r}: choose float32, bfloat16 or float16")
        if m.attention not in ATTENTION_KINDS:
            raise ConfigError(f"model.attention={m.attention!r}: choose one of {ATTENTION_KINDS}")
        if m.attention == "cudnn" and m.dtype == "float32":
            raise ConfigError("model.attention=cudnn needs model.dtype=bfloat16 or float16 (cuDNN flash attention has no "
                              "float32); use model.attention=auto or xla for float32")

    def validate_platform(self, platform: str) -> None:
        """ConfigError naming the field when the model cannot run on devices of `platform` (jax's Device.platform:
        cpu, gpu, tpu), checked at start-up by the commands that run the model (not by exports and imports)."""
        if self.attention == "cudnn" and platform not in CUDNN_PLATFORMS:
            raise ConfigError(f"model.attention=cudnn runs on NVIDIA GPUs only (cuDNN flash attention), but the devices "
                              f"here are {platform}; use model.attention=auto (splash on TPU, cuDNN on GPU, XLA "
                              "elsewhere) or xla, e.g. --set model.attention=auto, or run on a GPU")


def loops_per_layer(m: ModelConfig) -> int | None:
    """Fixed FFN loops of a variant without a depth router (None for depth-routed variants)."""
    if m.ffn in DEPTH_KINDS:
        return None
    return m.n_loops if m.ffn == "kloop" else 1
