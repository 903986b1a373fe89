"""Export a vffn_jax run to a Hugging Face model folder (safetensors, config, tokenizer, generation config).

    vffn-hf export --workdir runs/tiny --out hf/tiny [--step N] [--dtype bfloat16] [--max-shard-size 2GB]

* `model.ffn=dense`: a stock Llama checkpoint (`LlamaForCausalLM`, no custom code): the decoder is
  Llama's (pre-norm RMSNorm, RoPE in the rotate-half layout, SwiGLU, no biases).
* every other FFN kind: a custom architecture loaded with `trust_remote_code=True`; the folder carries
  `configuration_vffn.py` and `modeling_vffn.py` (Llama attention and norms from transformers, the FFN of
  `vffn_jax/model/ffn.py` at inference: each token's argmax depth, top-k virtual experts, the alpha gate).

The weights are `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json` when they exceed --max-shard-size. The tokenizer is the run's
`data.tokenizer` (see `vffn_jax/hf/tokenizer_files.py`); generation stops at its EOS token, which
generate.py also puts before each prompt. Logits beyond the tokenizer's vocabulary (padded embedding
rows) are suppressed in `generation_config.json`, as generate.py masks them.

The folder is written next to --out under a temporary name and renamed into place at the end, so it
appears complete or not at all; --out must not exist or be an empty folder, unless --overwrite: then a
non-empty --out is replaced by the new folder (its old files deleted) once that is complete. --out is a local
folder (export, then copy it, e.g. `gcloud storage cp -r`); --workdir may be gs://.

Exit status: 0 done, 2 bad input (missing run or step, non-empty --out without --overwrite, bad --dtype or
--max-shard-size).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_SHARD = "5GB"
MODELING_DIR = Path(__file__).resolve().parent / "modeling"
MODELING_FILES = ("configuration_vffn.py", "modeling_vffn.py")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """'2GB' (powers of 10, as transformers reads them), '500MiB', or a byte count -> bytes."""
    from vffn_jax.config import ConfigError

    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not m or m.group(2) not in _UNITS:
            raise ConfigError(f"--max-shard-size={text!r}: give a size such as 2GB, 500MB, 1GiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value < 1:
        raise ConfigError(f"--max-shard-size={text!r} must be positive")
    return value


def _check_out(out: Path, workdir, overwrite: bool) -> None:
    from vffn_jax import storage
    from vffn_jax.config import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={out} is a file, not a folder; export into a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out={out} already exists and is not an empty folder; export into a new or empty "
                              "folder, or pass --overwrite to replace it")
        run, here = storage.local_path(workdir), Path(os.path.realpath(out))
        if run is not None and (Path(os.path.realpath(run)) == here or here in Path(os.path.realpath(run)).parents):
            raise ConfigError(f"--out={out} holds the run --workdir={workdir}: --overwrite would delete it; export "
                              "into another folder")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out={out}: {out.parent} is a file, not a folder")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Renames the finished folder `tmp` to `out`; an `out` that is not empty (--overwrite, checked) is moved aside
    first and deleted after, so `out` always holds one complete export."""
    if not (out.is_dir() and any(out.iterdir())):
        os.rename(tmp, out)  # atomic; replaces an empty folder, fails on one that filled up meanwhile
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _rope_parameters(m) -> dict:
    if m.rope_scaling == "llama3":
        return {"rope_type": "llama3", "rope_theta": float(m.rope_theta), "factor": float(m.rope_factor),
                "low_freq_factor": float(m.rope_low_freq_factor), "high_freq_factor": float(m.rope_high_freq_factor),
                "original_max_position_embeddings": int(m.rope_original_max_len)}
    return {"rope_type": "default", "rope_theta": float(m.rope_theta)}


def hf_config(cfg, dtype: str, eos_id: int):
    """The transformers config object of the run `cfg`: LlamaConfig for dense, VffnConfig otherwise."""
    m = cfg.model
    common = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.train.seq_len, initializer_range=m.init_std, rms_norm_eps=m.norm_eps,
        use_cache=True, bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=m.tie_embeddings,
        rope_parameters=_rope_parameters(m), attention_bias=False, attention_dropout=0.0, mlp_bias=False,
        dtype=dtype)
    if m.ffn == "dense":
        from transformers import LlamaConfig

        config = LlamaConfig(**common)
        config.architectures = ["LlamaForCausalLM"]
        return config
    from vffn_jax.hf.modeling.configuration_vffn import VffnConfig

    config = VffnConfig(**common, ffn=m.ffn, n_experts=m.n_experts, n_top_experts=m.top_k, max_depth=m.max_depth,
                        n_loops=m.n_loops)
    config.architectures = ["VffnForCausalLM"]
    config.auto_map = {"AutoConfig": "configuration_vffn.VffnConfig",
                       "AutoModelForCausalLM": "modeling_vffn.VffnForCausalLM"}
    return config


def _add_legacy_keys(path: Path, m, dtype: str) -> None:
    """Also the pre-5.0 spellings (`torch_dtype`, top-level `rope_theta` / `rope_scaling`), for tools that read
    only those; transformers 5 folds them into `dtype` and `rope_parameters` to the same values."""
    data = json.loads(path.read_text())
    data["torch_dtype"] = dtype
    data["rope_theta"] = float(m.rope_theta)
    scaling = {k: v for k, v in _rope_parameters(m).items() if k != "rope_theta"}
    data["rope_scaling"] = scaling if m.rope_scaling != "none" else None
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _to_torch(array, dtype: str):
    import numpy as np
    import torch

    if array.dtype.name not in ("float32", "float16", "float64"):  # e.g. ml_dtypes bfloat16: exact through f32
        array = array.astype(np.float32)
    array = np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"])  # torch wants a writable buffer
    return torch.from_numpy(array).to(getattr(torch, dtype)).contiguous()


def write_weights(tensors, out: Path, dtype: str, max_shard_bytes: int) -> dict:
    """Writes (name, array) pairs as safetensors, a new shard whenever the next tensor would pass the limit
    (a tensor larger than the limit gets a shard of its own); returns {"files", "total_size", "n_params"}."""
    from safetensors.torch import save_file

    shards: list[dict] = []
    current: dict = {}
    size = total = n_params = 0

    def flush():
        nonlocal current, size
        if current:
            name = f"shard-{len(shards):05d}.tmp"
            save_file(current, str(out / name), metadata={"format": "pt"})
            shards.append({"tmp": name, "names": list(current)})
            current, size = {}, 0

    for name, array in tensors:
        t = _to_torch(array, dtype)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = t
        size += nbytes
        total += nbytes
        n_params += t.numel()
    flush()
    if len(shards) == 1:
        os.replace(out / shards[0]["tmp"], out / "model.safetensors")
        return {"files": ["model.safetensors"], "total_size": total, "n_params": n_params}
    weight_map, files = {}, []
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / shard["tmp"], out / fname)
        files.append(fname)
        weight_map.update({n: fname for n in shard["names"]})
    index = {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"files": files, "total_size": total, "n_params": n_params}


def _publish_permissions(folder: Path) -> None:
    """The modes a plain mkdir/open would give (mkdtemp and safetensors create owner-only ones)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def export(workdir, out, *, step: int | None = None, dtype: str | None = None,
           max_shard_bytes: int | str = DEFAULT_SHARD, overwrite: bool = False) -> dict:
    """Writes the Hugging Face folder `out` for the run `workdir` (checkpoint `step`, default the latest);
    returns a summary. ConfigError / FileNotFoundError for bad input, before anything is written. `overwrite`:
    a non-empty `out` is replaced (else refused)."""
    from vffn_jax.config import ConfigError

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}: choose one of {DTYPES}")
    max_shard_bytes = parse_size(max_shard_bytes)
    if str(out).startswith("gs://"):
        raise ConfigError(f"--out={out}: export to a local folder, then copy it (e.g. `gcloud storage cp -r`)")
    out = Path(os.path.abspath(os.path.expanduser(str(out))))
    _check_out(out, workdir, overwrite)

    from transformers import GenerationConfig

    from vffn_jax.checkpoint.restore import restore_params
    from vffn_jax.hf import tokenizer_files
    from vffn_jax.hf.weights import hf_tensors

    run = restore_params(workdir, step, runs_model=False)
    cfg, m = run.cfg, run.cfg.model
    dtype = dtype or m.param_dtype
    if dtype not in DTYPES:
        raise ConfigError(f"model.param_dtype={dtype!r} has no Hugging Face counterpart; pass --dtype from {DTYPES}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok = tokenizer_files.write(cfg.data.tokenizer, tmp, context=cfg.train.seq_len)
        if tok["vocab_size"] > m.vocab_size:
            raise ConfigError(f"the run's tokenizer has {tok['vocab_size']} tokens but the model only "
                              f"{m.vocab_size} embedding rows (model.vocab_size)")
        config = hf_config(cfg, dtype, tok["eos_id"])
        config.save_pretrained(str(tmp))
        _add_legacy_keys(tmp / "config.json", m, dtype)
        if m.ffn != "dense":
            for name in MODELING_FILES:
                shutil.copyfile(MODELING_DIR / name, tmp / name)
        # greedy by default (no sampling fields); padded embedding rows are never generated, as in generate.py
        gen = GenerationConfig(bos_token_id=tok["eos_id"], eos_token_id=tok["eos_id"], pad_token_id=tok["eos_id"],
                               suppress_tokens=list(range(tok["vocab_size"], m.vocab_size)) or None)
        gen.save_pretrained(str(tmp))
        weights = write_weights(hf_tensors(m, run.params), tmp, dtype, max_shard_bytes)
        _publish_permissions(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes = []
    if m.doc_mask:
        notes.append("model.doc_mask=true: the exported model attends across EOS tokens inside a sequence "
                     "(transformers has no document mask); outputs agree for inputs without an inner EOS")
    return {"workdir": str(run.workdir), "step": run.step, "out": str(out), "ffn": m.ffn,
            "architecture": config.architectures[0], "trust_remote_code": m.ffn != "dense", "dtype": dtype,
            "files": weights["files"], "param_bytes": weights["total_size"], "n_params": weights["n_params"],
            "tokenizer": cfg.data.tokenizer, "notes": notes}
