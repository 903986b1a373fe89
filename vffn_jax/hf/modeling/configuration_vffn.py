"""VffnConfig: a Llama config plus the FFN fields of a vffn_jax model (docs/method.md).

Copied into every non-dense Hugging Face export by `vffn_jax.hf.export`; loaded with
`AutoConfig.from_pretrained(DIR, trust_remote_code=True)`. The attention, norms and RoPE are Llama's, so
every Llama field keeps its meaning. The number of experts chosen per token is `n_top_experts`, not
`top_k`: a config key named `top_k` would be read by `generate()` as a sampling default.
"""
from transformers.models.llama.configuration_llama import LlamaConfig

FFN_KINDS = ("dense", "kloop", "width_only", "width_shared", "depth_only", "versatile", "versatile_avg", "moe")
EXPERT_KINDS = ("width_only", "width_shared", "versatile", "versatile_avg", "moe")  # have an expert router
DEPTH_KINDS = ("depth_only", "versatile", "versatile_avg")  # have a depth router


class VffnConfig(LlamaConfig):
    model_type = "vffn"

    ffn: str = "versatile"  # one of FFN_KINDS
    n_experts: int = 8  # E virtual experts (moe: real experts of width intermediate_size / E)
    n_top_experts: int = 2  # k experts chosen per token
    max_depth: int = 4  # L: the depth router's choices 1..L
    n_loops: int = 4  # K: loops of the kloop baseline

    def validate_architecture(self):
        super().validate_architecture()
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn={self.ffn!r}: choose one of {FFN_KINDS}")
        if self.ffn in EXPERT_KINDS and (self.n_experts < 1 or self.intermediate_size % self.n_experts
                                         or not 1 <= self.n_top_experts <= self.n_experts):
            raise ValueError(f"ffn={self.ffn} needs n_experts dividing intermediate_size={self.intermediate_size} "
                             f"and 1 <= n_top_experts <= n_experts (got {self.n_experts}, {self.n_top_experts})")
        if self.ffn in DEPTH_KINDS and self.max_depth < 1:
            raise ValueError(f"max_depth={self.max_depth} must be >= 1")
        if self.ffn == "kloop" and self.n_loops < 1:
            raise ValueError(f"n_loops={self.n_loops} must be >= 1")


__all__ = ["VffnConfig"]
