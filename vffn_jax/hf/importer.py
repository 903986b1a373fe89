"""Import a Hugging Face Llama-family checkpoint as a vffn_jax run directory.

    vffn-hf import --hf DIR --out RUN [--variant versatile] [--set key=value ...] [--dtype bfloat16]

DIR is a local Hugging Face model folder: config.json, the weights as `*.safetensors` (one file, or shards
with `model.safetensors.index.json`) and normally `tokenizer.json`. Model types llama and mistral (without a
sliding window) import, and any other whose config.json fields are all a plain Llama's; anything vffn_jax
would compute differently (biases, QK-norm, sliding windows, other RoPE scalings or activations) is refused
naming the field (vffn_jax/hf/hf_config.py).

RUN is a params-only run directory like `vffn-export` writes (config.json +
checkpoints/0/params): eval.py and generate.py restore it, `train.py --init-from RUN` continues pretraining
from it. Its config: the checkpoint's shapes, RoPE, norm eps and tied embeddings, train.seq_len =
min(max_position_embeddings, 4096), the --variant preset's FFN fields, then --set. With a --variant other than
dense, the parameters a Llama lacks (routers, moe experts) get the model's own initialisation with
train.seed, exactly as `--init-from` from a dense vffn_jax run gives them; every other weight is copied.

The tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, ...) are copied into
RUN/tokenizer/ and data.tokenizer names RUN/tokenizer/tokenizer.json (an absolute path: move the run and
set it again); model.eos_id is that tokenizer's EOS id. The weights are read one tensor at a time; the run
is written next to RUN under a temporary name and renamed into place at the end. Local folders only.

Exit status: 0 done, 2 bad input (missing files, a field or tensor vffn_jax cannot import, an --out that
already holds checkpoints or other files).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vffn_jax.config import ConfigError
from vffn_jax.data.tokenizer import check_model_fits

DTYPES = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")
TOKENIZER_DIR = "tokenizer"
IMPORT_RECORD = "hf_import.json"


# --------------------------------------------------------------------------- the safetensors files


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index when there is one)."""
    from safetensors import safe_open

    index = hf_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{index} is not a safetensors index (no weight_map: {e})") from None
        out = {name: hf_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(out.values())):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found, but {index} lists tensors in it; download every shard")
        return out
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = (f" (found {', '.join(others)}: load and re-save them with transformers' save_pretrained)"
                if others else "")
        raise FileNotFoundError(f"no *.safetensors weights in {hf_dir}{hint}; vffn_jax reads safetensors only")
    out: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                if name in out:
                    raise ConfigError(f"tensor {name!r} is in both {out[name].name} and {path.name} and there is no "
                                      f"{INDEX}; keep one set of weight files in {hf_dir}")
                out[name] = path
    return out


class TensorReader:
    """Reads one tensor at a time, as a host array in the stored dtype (bfloat16 included).

    safetensors' numpy framework has no bfloat16, so tensors are read with its flax framework onto the host
    CPU device (np.asarray of it is a view: each tensor is read once and never lands on an accelerator)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, Any] = {}
        self.dtypes: dict[str, str] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _handle(self, name: str):
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="flax"))
        return self._open[path]

    def dtype(self, name: str) -> str:
        """The stored dtype ("F32", "BF16", ...) from the file header, without reading the data."""
        if name not in self.dtypes:
            self.dtypes[name] = self._handle(name).get_slice(name).get_dtype()
        return self.dtypes[name]

    def check_dtype(self, name: str) -> None:
        if self.dtype(name) not in SAFETENSORS_DTYPES:
            raise ConfigError(f"tensor {name!r} in {self.files[name].name} is {self.dtype(name)}: vffn_jax imports "
                              "float weights (F32, BF16, F16), not quantized ones")

    def __call__(self, name: str):
        import jax
        import numpy as np

        self.check_dtype(name)
        try:
            cpu = jax.devices("cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS without cpu: the default device
            cpu = None
        with jax.default_device(cpu) if cpu is not None else contextlib.nullcontext():
            return np.asarray(self._handle(name).get_tensor(name))


# --------------------------------------------------------------------------- the run config


def _variant_preset(variant: str) -> dict[str, Any]:
    from vffn_jax import config as config_lib

    path = Path(variant)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"--variant={variant}: file not found")
        return json.loads(path.read_text())
    path = config_lib.CONFIGS_DIR / "variants" / f"{variant}.json"
    if not path.is_file():
        raise ConfigError(f"--variant={variant!r}: choose one of {config_lib.available('variants')} or a .json path")
    return json.loads(path.read_text())


def _check_out(out: Path) -> None:
    from vffn_jax.checkpoint import manager as ckpt

    if str(out).startswith("gs://"):
        raise ConfigError(f"--out={out}: import into a local folder, then copy it (e.g. `gcloud storage cp -r`)")
    if out.exists():
        if out.is_dir() and ckpt.all_steps(out):
            raise ConfigError(f"--out={out} already holds checkpoints {ckpt.all_steps(out)}; import into a new folder")
        if not out.is_dir() or any(out.iterdir()):
            raise ConfigError(f"--out={out} already exists and is not an empty folder; import into a new or empty one")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out={out}: its parent folder {out.parent} does not exist; create it first")


def build_config(hf: dict, *, name: str, variant: str | None, overrides: dict[str, Any], tokenizer: str | None,
                 eos_id: int | None, param_dtype: str):
    """The run's Config: Config() defaults <- the checkpoint's fields <- the variant preset <- --set."""
    from vffn_jax import config as config_lib
    from vffn_jax.hf import hf_config

    cfg = config_lib.apply_overrides(config_lib.Config(), {**hf_config.overrides(hf), "model.ffn": "dense",
                                                           "model.param_dtype": param_dtype})
    if variant:
        cfg = config_lib.apply_overrides(cfg, _variant_preset(variant))
    derived: dict[str, Any] = {}
    if tokenizer is not None:
        derived["data.tokenizer"] = tokenizer
    if eos_id is not None:
        derived["model.eos_id"] = eos_id
    cfg = config_lib.apply_overrides(cfg, derived)
    cfg = dataclasses.replace(cfg, scale=f"hf:{name}", variant=Path(variant).stem if variant else "dense")
    cfg = config_lib.apply_overrides(cfg, overrides)
    config_lib.validate(cfg)
    return cfg


def _source_dtype(reader: TensorReader, names: list[str]) -> str:
    for name in names:
        reader.check_dtype(name)
    kinds = {SAFETENSORS_DTYPES[reader.dtype(n)] for n in names}
    return kinds.pop() if len(kinds) == 1 else "float32"  # mixed (or none): the exact common type


def _unused_tensors(m, files: dict[str, Path]) -> list[str]:
    """Tensors the checkpoint holds beyond what the model uses and transformers would ignore too (RoPE
    buffers; a tied model's stored lm_head.weight, which transformers replaces by the embedding); ConfigError
    naming any other."""
    from vffn_jax.hf.weights import expected_names

    expected = set(expected_names(m))
    ignored = []
    for name in sorted(set(files) - expected):
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and m.tie_embeddings):
            ignored.append(name)
            continue
        raise ConfigError(f"the checkpoint holds tensor {name!r} ({files[name].name}), which a plain Llama with "
                          "this config.json does not have (biases? another architecture?); vffn_jax cannot import it")
    return ignored


# --------------------------------------------------------------------------- the parameters


def build_params(cfg, arrays: dict, devices=None):
    """The model's parameter state (an nnx.State, placed on the mesh): every leaf of `arrays` (vffn_jax's
    nested dict, host arrays) whose name and shape the model has is copied, cast to model.param_dtype; the
    others get this model's own initialisation with train.seed, as `train.init_from` gives them. Returns
    (state, copied names, fresh names)."""
    import functools

    import jax
    from flax import nnx

    from vffn_jax.checkpoint.restore import fit_to_devices
    from vffn_jax.model import placement
    from vffn_jax.model.transformer import Transformer

    devices = list(devices) if devices is not None else jax.devices()
    s = placement.setup(fit_to_devices(cfg, len(devices))[0], devices)
    by_name = {placement.param_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(arrays)[0]}
    shardings = {placement.param_name(p): sh for p, sh in jax.tree_util.tree_flatten_with_path(s.param_shardings)[0]}
    leaves = {placement.param_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(s.abstract_params)[0]}
    copied = [n for n, leaf in leaves.items() if n in by_name and tuple(by_name[n].shape) == tuple(leaf.shape)]
    fresh = [n for n in leaves if n not in copied]
    values = {}
    if fresh:
        m, seed = cfg.model, cfg.train.seed

        # the whole model's init, of which XLA keeps only the fresh leaves: their values are init_params'
        @functools.partial(jax.jit, out_shardings={n: shardings[n] for n in fresh})
        def init_fresh():
            state = nnx.state(Transformer(m, nnx.Rngs(seed)))
            flat = {placement.param_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
            return {n: flat[n] for n in fresh}

        values.update(init_fresh())
    for n in copied:
        values[n] = jax.device_put(by_name[n].astype(leaves[n].dtype, copy=False), shardings[n])
    state = jax.tree_util.tree_map_with_path(lambda p, _: values[placement.param_name(p)], s.abstract_params)
    return state, copied, fresh


# --------------------------------------------------------------------------- the import


def _tokenizer(hf_dir: Path, overrides: dict[str, Any], final_out: Path):
    """(data.tokenizer to record or None when --set gives it, the tokenizer to check against)."""
    from vffn_jax.data.tokenizer import HFTokenizer, load_tokenizer

    if "data.tokenizer" in overrides:
        return None, load_tokenizer(str(overrides["data.tokenizer"]))
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: vffn_jax reads HF `tokenizers` JSON files; save the model's fast "
                                "tokenizer there (AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) or pass "
                                "--set data.tokenizer=PATH")
    return str(final_out / TOKENIZER_DIR / "tokenizer.json"), HFTokenizer(path)


def import_hf(hf_dir, out, *, variant: str | None = None, overrides: dict[str, Any] | None = None,
              dtype: str | None = None, devices=None) -> dict:
    """Writes the run directory `out` from the Hugging Face folder `hf_dir`; returns a summary. ConfigError /
    FileNotFoundError for bad input, raised before anything is written."""
    import jax

    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.hf import hf_config
    from vffn_jax.hf.weights import params_from_hf
    from vffn_jax.rundir import RunDir

    overrides = dict(overrides or {})
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}: choose one of {DTYPES}")
    hf_dir = Path(os.path.abspath(os.path.expanduser(str(hf_dir))))
    out = Path(os.path.abspath(os.path.expanduser(str(out))))
    hf = hf_config.load(hf_dir)
    hf_config.overrides(hf)  # refuse an unsupported architecture before touching the weights
    _check_out(out)
    files = weight_files(hf_dir)
    tok_spec, tok = _tokenizer(hf_dir, overrides, out)
    notes: list[str] = []
    with TensorReader(files) as reader:
        source_dtype = _source_dtype(reader, [n for n in files if not n.endswith("rotary_emb.inv_freq")])
        cfg = build_config(hf, name=hf_dir.name, variant=variant, overrides=overrides, tokenizer=tok_spec,
                           eos_id=None if "model.eos_id" in overrides else tok.eos_id,
                           param_dtype=dtype or source_dtype)
        m = cfg.model
        check_model_fits(tok, m, source=f"{hf_dir} (config.json vocab_size, tokenizer.json)")
        ignored = _unused_tensors(_dense(m), files)
        arrays = params_from_hf(_dense(m), reader, set(files))
    eos_ids = hf_config.eos_token_ids(hf)
    if eos_ids and tok.eos_id not in eos_ids:
        notes.append(f"the tokenizer's EOS (id {tok.eos_id}, the document separator vffn_jax uses) is not "
                     f"config.json's eos_token_id {eos_ids}")
    if hf.get("bos_token_id") is not None and hf["bos_token_id"] != tok.eos_id:
        notes.append(f"the model was trained with BOS id {hf['bos_token_id']} opening each document; vffn_jax's "
                     f"tools put the EOS (id {tok.eos_id}) before prompts instead")
    max_pos = hf.get("max_position_embeddings")
    if max_pos and max_pos > cfg.train.seq_len:
        notes.append(f"train.seq_len={cfg.train.seq_len} (config.json max_position_embeddings={max_pos}); "
                     "--set train.seq_len=N for a longer context")
    if ignored:
        notes.append(f"not imported (transformers ignores them too): {', '.join(ignored[:3])}"
                     f"{' ...' if len(ignored) > 3 else ''}")

    state, copied, fresh = build_params(cfg, arrays, devices)
    del arrays
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        is_main = jax.process_index() == 0
        RunDir.at(tmp).prepare(cfg, is_main=is_main)
        manager = ckpt.make_manager(tmp, cfg.run)
        ckpt.save(manager, 0, state, None, force=True)
        ckpt.wait_until_finished(manager)
        manager.close()
        (tmp / TOKENIZER_DIR).mkdir()
        copied_tok = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
        for f in copied_tok:
            shutil.copyfile(hf_dir / f, tmp / TOKENIZER_DIR / f)
        info = {"hf_dir": str(hf_dir), "out": str(out), "model_type": hf.get("model_type"), "ffn": m.ffn,
                "variant": cfg.variant, "param_dtype": m.param_dtype, "source_dtype": source_dtype,
                "n_params": int(sum(x.size for x in jax.tree.leaves(state))), "copied": copied, "fresh": fresh,
                "ignored": ignored, "tokenizer": cfg.data.tokenizer, "tokenizer_files": copied_tok,
                "eos_id": m.eos_id, "seq_len": cfg.train.seq_len, "notes": notes}
        (tmp / IMPORT_RECORD).write_text(json.dumps({**info, "hf_config": hf}, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is owner-only
        if out.exists():  # an empty folder (checked above): rename replaces only a missing or empty target
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _dense(m):
    """The checkpoint's own model: the same shapes with the dense FFN (what a Llama's tensors fill)."""
    return dataclasses.replace(m, ffn="dense")
