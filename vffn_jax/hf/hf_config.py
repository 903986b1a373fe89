"""A Hugging Face Llama-family `config.json` -> vffn_jax config overrides, or a ConfigError naming the field.

vffn_jax's decoder is exactly a plain Llama (pre-norm RMSNorm, rotate-half RoPE, grouped-query attention
without biases or QK-norm, SwiGLU): `model_type` llama and mistral (without a sliding window) qualify, and any
other model type whose every field is one a plain Llama has. Everything that would change the math and that
vffn_jax cannot reproduce is refused rather than silently imported as something else.

Missing optional fields take transformers' own defaults (LlamaConfig / MistralConfig), so a file is read the
way `AutoModelForCausalLM.from_pretrained` would read it. Both the older top-level `rope_theta`/`rope_scaling`
and transformers 5's `rope_parameters` are understood.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vffn_jax.config import ConfigError

# train.seq_len is the context every vffn_jax tool uses (training, held-out eval, generate.py, downstream tasks):
# the paper's and vffn_jax's default; Llama 3.1's 131072 positions would make the default held-out eval batch
# (train.batch_size x seq_len tokens) absurd. `--set train.seq_len=N` takes more.
SEQ_LEN_CAP = 4096
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
PLAIN_TYPES = ("llama", "mistral")
# model types that look like a Llama in config.json but compute something else
DIFFERENT_TYPES = {
    "qwen3": "QK-norm", "qwen3_moe": "QK-norm and a mixture-of-experts FFN", "olmo2": "QK-norm and post-norm blocks",
    "olmo3": "QK-norm and post-norm blocks", "olmo": "non-parametric LayerNorm", "qwen2": "q/k/v projection biases",
    "gemma": "(1 + w) RMSNorm and scaled embeddings", "gemma2": "(1 + w) RMSNorm, soft-capping, sliding windows",
    "gemma3": "(1 + w) RMSNorm, QK-norm, sliding windows", "gemma3_text": "(1 + w) RMSNorm, QK-norm, sliding windows",
    "granite": "embedding/residual/attention/logit multipliers", "mixtral": "a mixture-of-experts FFN",
    "cohere": "LayerNorm and parallel blocks", "phi3": "fused qkv/gate-up projections", "minicpm": "scaled embeddings",
    "stablelm": "LayerNorm and partial RoPE", "deepseek_v2": "latent attention", "deepseek_v3": "latent attention",
}
# every field a plain Llama's (or Mistral's) config.json may hold, plus transformers' generic ones
LLAMA_FIELDS = frozenset("""
    _name_or_path architectures attention_bias attention_dropout bos_token_id chunk_size_feed_forward dtype torch_dtype
    eos_token_id head_dim hidden_act hidden_size id2label label2id initializer_range intermediate_size
    is_encoder_decoder max_position_embeddings mlp_bias model_type num_attention_heads num_hidden_layers
    num_key_value_heads output_attentions output_hidden_states pad_token_id pretraining_tp problem_type return_dict
    rms_norm_eps rope_parameters rope_scaling rope_theta sliding_window tie_word_embeddings transformers_version
    use_cache vocab_size tokenizer_class prefix sep_token_id decoder_start_token_id finetuning_task task_specific_params
    """.split())
_QK_NORM = re.compile(r"qk_?(layer_?)?norm", re.IGNORECASE)


def load(hf_dir) -> dict[str, Any]:
    """`hf_dir/config.json` as a dict; FileNotFoundError / ConfigError naming the file."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f"--hf={hf_dir}: no such folder; point it at a local Hugging Face model folder "
                                "(config.json + *.safetensors), e.g. one `huggingface-cli download` wrote")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --hf must be a Hugging Face model folder holding config.json "
                                "and the *.safetensors weights")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _refuse(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config.json: {field}={json.dumps(value)}: {why}; vffn_jax imports plain Llama-family "
                       "checkpoints only (docs/huggingface.md)")


def _check_architecture(hf: dict[str, Any]) -> None:
    model_type = hf.get("model_type")
    if model_type in DIFFERENT_TYPES:
        raise _refuse("model_type", model_type, f"this architecture has {DIFFERENT_TYPES[model_type]}, which a "
                                                "Llama does not")
    if "quantization_config" in hf:
        raise _refuse("quantization_config", hf["quantization_config"].get("quant_method", "?")
                      if isinstance(hf["quantization_config"], dict) else hf["quantization_config"],
                      "a quantized checkpoint; import the unquantized (bf16/f16/f32) weights")
    for key, value in hf.items():
        if _QK_NORM.search(key) and value:
            raise _refuse(key, value, "QK-norm (a norm on queries and keys), which vffn_jax's attention does not have")
    if model_type not in PLAIN_TYPES:
        unknown = sorted(k for k in hf if k not in LLAMA_FIELDS)
        if unknown:
            raise _refuse(unknown[0], hf[unknown[0]], f"model_type {model_type!r} is not llama or mistral, and this "
                                                      "field is not one a plain Llama config has")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _refuse(key, hf[key], "biases in the projections; vffn_jax's linear layers have none")
    # MistralConfig's default window is 4096: a mistral config without the field has one
    window = hf.get("sliding_window", 4096 if model_type == "mistral" else None)
    if window is not None or hf.get("use_sliding_window"):
        raise _refuse("sliding_window", window, "sliding-window attention; vffn_jax attends to the whole context "
                                                "(Mistral v0.2+ has sliding_window null)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse("hidden_act", act, "the FFN activation must be silu (SwiGLU)")


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """model.rope_* overrides from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older)."""
    params = hf.get("rope_parameters")
    field = "rope_parameters"
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise _refuse(field, sorted(params), "RoPE parameters per layer type (sliding and full attention layers)")
    if params is not None and not isinstance(params, dict):
        raise _refuse(field, params, "expected an object")
    if not params:
        params, field = dict(hf.get("rope_scaling") or {}), "rope_scaling"
        if not isinstance(params, dict):
            raise _refuse(field, params, "expected an object or null")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"model.rope_theta": float(theta), "model.rope_scaling": "none"}
    if kind == "default":
        return out
    if kind != "llama3":
        raise _refuse(f"{field}.rope_type", kind, "vffn_jax's RoPE is the default one or Llama 3's scaling (llama3)")
    names = {"factor": "model.rope_factor", "low_freq_factor": "model.rope_low_freq_factor",
             "high_freq_factor": "model.rope_high_freq_factor",
             "original_max_position_embeddings": "model.rope_original_max_len"}
    out["model.rope_scaling"] = "llama3"
    for key, ours in names.items():
        if params.get(key) is None:
            raise ConfigError(f"config.json: {field} has rope_type llama3 but no {key!r}, which Llama 3 scaling needs")
        out[ours] = int(params[key]) if ours == "model.rope_original_max_len" else float(params[key])
    return out


def _int(hf: dict[str, Any], key: str) -> int:
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(key, value, "expected a positive integer")
    return value


def overrides(hf: dict[str, Any]) -> dict[str, Any]:
    """Dotted vffn_jax overrides (`{"model.d_model": 2048, ..., "train.seq_len": 4096}`) for the plain Llama
    `hf` describes; ConfigError naming the field for anything else."""
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise ConfigError(f"config.json has no {missing[0]!r} (needs all of {', '.join(REQUIRED)}); is this a "
                          "Llama-family causal LM's config?")
    _check_architecture(hf)
    d, n = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
    kv = _int(hf, "num_key_value_heads") if hf.get("num_key_value_heads") is not None else n
    if d % n:
        raise _refuse("num_attention_heads", n, f"does not divide hidden_size={d}")
    if hf.get("head_dim") is not None and hf["head_dim"] != d // n:
        raise _refuse("head_dim", hf["head_dim"],
                      f"vffn_jax's head width is hidden_size/num_attention_heads = {d // n}")
    if n % kv:
        raise _refuse("num_key_value_heads", kv, f"does not divide num_attention_heads={n}")
    default_max_pos = 131072 if hf.get("model_type") == "mistral" else 2048  # MistralConfig's / LlamaConfig's
    max_pos = (_int(hf, "max_position_embeddings") if hf.get("max_position_embeddings") is not None
               else default_max_pos)
    return {
        "model.vocab_size": _int(hf, "vocab_size"), "model.d_model": d, "model.n_layers": _int(hf, "num_hidden_layers"),
        "model.n_heads": n, "model.n_kv_heads": 0 if kv == n else kv, "model.d_ff": _int(hf, "intermediate_size"),
        "model.norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **_rope(hf),
        "train.seq_len": min(max_pos, SEQ_LEN_CAP),
    }


def eos_token_ids(hf: dict[str, Any]) -> list[int]:
    """config.json's `eos_token_id` as a list (Llama 3 instruct models list several)."""
    eos = hf.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
