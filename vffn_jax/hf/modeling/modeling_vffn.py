"""VffnForCausalLM: a Llama decoder whose MLP is one of vffn_jax's FFN variants, inference forward only.

Copied into every non-dense Hugging Face export by `vffn_jax.hf.export` and loaded with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. Only torch and transformers are
imported. Attention, RMSNorm, RoPE, the KV cache, masks and `generate()` are transformers' own Llama
code (`LlamaModel.forward`, `LlamaForCausalLM.forward`, `GenerationMixin`); only the decoder layer is
replaced, because a vffn_jax FFN returns the new residual stream (its residual is part of each loop) and
applies the pre-FFN norm (`post_attention_layernorm`) again in every loop.

The FFN is vffn_jax's inference path (`vffn_jax/model/ffn.py` with train=False, docs/method.md 2-5):

    act(z)  = silu(norm(z) W_gate) * (norm(z) W_up)         FFN(z) = z + act(z) W_down   (one loop)
    kloop          FFN applied n_loops times
    width_only     x + (m * act(x)) W_down                   m: each chosen expert's gate on its slice of units
    width_shared   x + ((1 + m) * act(x)) W_down
    depth_only     y_depth, depth = argmax(x W_depth) + 1, y_1 = FFN(x), y_l = FFN(y_(l-1))
    versatile      (1 - alpha) y_depth + alpha x_width,  alpha = (max_depth - depth) / max_depth
    versatile_avg  the same with alpha = 0.5
    moe            x + act(x) W_down + sum_j w_j expert_(idx_j)(norm(x))

Routers read the un-normalised `x` in float32; the gates are the softmax over the k selected logits.
After a forward, `model.model.layers[i].mlp.last_depth` holds each token's depth in layer i (depth kinds).
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_vffn import DEPTH_KINDS, EXPERT_KINDS, VffnConfig

try:  # transformers 5: initialisers that leave weights loaded from the checkpoint alone
    from transformers import initialization as _init
except ImportError:
    _init = nn.init


class VffnMLP(nn.Module):
    """The FFN of one layer; `forward(x, norm)` returns the new residual stream (the FFN's residual included)."""

    def __init__(self, config):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.kind = config.ffn
        self.n_experts, self.top_k = config.n_experts, config.n_top_experts
        self.max_depth, self.n_loops = config.max_depth, config.n_loops
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        if self.kind in EXPERT_KINDS:
            self.expert_router = nn.Linear(d, self.n_experts, bias=False)
        if self.kind in DEPTH_KINDS:
            self.depth_router = nn.Linear(d, self.max_depth, bias=False)
        if self.kind == "moe":  # E real experts of width f/E, stacked in vffn_jax's [E, in, out] layout
            fe = f // self.n_experts
            self.expert_w_gate = nn.Parameter(torch.empty(self.n_experts, d, fe))
            self.expert_w_up = nn.Parameter(torch.empty(self.n_experts, d, fe))
            self.expert_w_down = nn.Parameter(torch.empty(self.n_experts, fe, d))
        self.last_depth = None

    def hidden(self, z, norm):
        n = norm(z)
        return F.silu(self.gate_proj(n)) * self.up_proj(n)

    def loop(self, z, norm):
        return z + self.down_proj(self.hidden(z, norm))

    def gates(self, x):
        """Dense gates `[..., E]`: softmax over the top-k router logits (float32), 0 for the other experts."""
        logits = F.linear(x.float(), self.expert_router.weight.float())
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))

    def width(self, x, hidden, gates):
        """`x + (m * act(x)) W_down`, where the mask m holds expert e's gate on its contiguous slice of units."""
        mask = gates.to(hidden.dtype).repeat_interleave(hidden.shape[-1] // self.n_experts, dim=-1)
        return x + self.down_proj(hidden * mask)

    def depth_path(self, x, hidden, norm):
        """(y_depth, depth): each token's own loop count, the loop stopping at the deepest token."""
        depth = torch.argmax(F.linear(x.float(), self.depth_router.weight.float()), dim=-1) + 1
        self.last_depth = depth.detach()
        y = x + self.down_proj(hidden)
        for loop in range(1, int(depth.max())):
            y = torch.where((depth > loop)[..., None], self.loop(y, norm), y)
        return y, depth

    def forward(self, x, norm):
        kind = self.kind
        if kind == "dense":
            return self.loop(x, norm)
        if kind == "kloop":
            for _ in range(self.n_loops):
                x = self.loop(x, norm)
            return x
        if kind == "moe":
            n = norm(x)
            dense_out = self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))
            h = F.silu(torch.einsum("...d,edh->...eh", n, self.expert_w_gate)) * torch.einsum(
                "...d,edh->...eh", n, self.expert_w_up)
            h = h * self.gates(x)[..., None].to(h.dtype)
            return x + dense_out + torch.einsum("...eh,ehd->...d", h, self.expert_w_down)
        hidden = self.hidden(x, norm)
        if kind == "width_only":
            return self.width(x, hidden, self.gates(x))
        if kind == "width_shared":  # the shared expert (every unit, weight 1) plus the routed virtual experts
            return self.width(x, hidden, 1 + self.gates(x))
        y_depth, depth = self.depth_path(x, hidden, norm)
        if kind == "depth_only":
            return y_depth
        if kind == "versatile":
            alpha = ((self.max_depth - depth.float()) / self.max_depth)[..., None].to(x.dtype)
        else:  # versatile_avg
            alpha = torch.full_like(x[..., :1], 0.5)
        return (1 - alpha) * y_depth + alpha * self.width(x, hidden, self.gates(x))


class VffnDecoderLayer(nn.Module):
    """`x = h + attn(input_layernorm(h))`, then the FFN, which returns the new residual stream itself."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = VffnMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        # kwargs carry the KV cache under whatever name this transformers version's LlamaAttention takes
        # (`cache` in 5.x, `past_key_values` before), plus position_ids and use_cache
        attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                     position_embeddings=position_embeddings, **kwargs)
        return self.mlp(hidden_states + attn_out, self.post_attention_layernorm)


class VffnPreTrainedModel(LlamaPreTrainedModel):
    config_class = VffnConfig
    _no_split_modules = ["VffnDecoderLayer"]
    _can_record_outputs = {"hidden_states": VffnDecoderLayer, "attentions": LlamaAttention}
    _can_compile_fullgraph = False  # the depth loop's trip count is the deepest token's depth (data-dependent)
    supports_gradient_checkpointing = False  # an inference forward: argmax depth gives the router no gradient

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VffnMLP) and module.kind == "moe":  # only reached for weights a checkpoint lacks
            for w in (module.expert_w_gate, module.expert_w_up, module.expert_w_down):
                _init.normal_(w, mean=0.0, std=self.config.initializer_range)


class VffnModel(VffnPreTrainedModel, LlamaModel):
    """LlamaModel (its forward: embedding, RoPE, causal mask, cache, final norm) with vffn decoder layers."""

    def __init__(self, config):
        VffnPreTrainedModel.__init__(self, config)  # not LlamaModel.__init__: it would build Llama layers first
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([VffnDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class VffnForCausalLM(VffnPreTrainedModel, LlamaForCausalLM):
    """LlamaForCausalLM (forward, tied head, GenerationMixin) over VffnModel."""

    def __init__(self, config):
        VffnPreTrainedModel.__init__(self, config)
        self.model = VffnModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["VffnForCausalLM", "VffnModel", "VffnPreTrainedModel"]
