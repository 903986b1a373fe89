"""Import a Hugging Face Llama-family checkpoint as a vffn_jax run directory.

    vffn-hf import --hf DIR --out RUN [--variant versatile] [--set key=value ...] [--dtype bfloat16]

DIR is a Hugging Face model folder, local or gs://: config.json, the weights as `*.safetensors` (one file, or
shards with `model.safetensors.index.json`) and normally `tokenizer.json`. A gs:// folder's top-level files are
copied into a local temporary folder first (config and tokenizer, then, once the config is checked, the
weights), as safetensors reads local files; it is deleted at the end. Model types llama and mistral (without a
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
set it again); model.eos_id is that tokenizer's EOS id. The weights are read one tensor at a time. A local RUN
is written next to itself under a temporary name and renamed into place at the end; a gs:// RUN is written in
place like a training workdir (the checkpoint commits last) and deleted again if the import fails.

Exit status: 0 done, 2 bad input (missing files, a truncated or damaged safetensors file, a field or tensor
vffn_jax cannot import, an --out that already holds checkpoints or other files).
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

from vffn_jax import storage
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


def damaged(path, e: BaseException) -> ConfigError:
    """The error for a safetensors file that safetensors cannot read (truncated, e.g. an interrupted download)."""
    return ConfigError(f"{path} is not a readable safetensors file ({str(e).strip() or type(e).__name__}): it is "
                       "truncated or damaged, e.g. by an interrupted download; download it again (e.g. "
                       "`huggingface-cli download REPO --local-dir DIR --force-download`) or re-save the model with "
                       "transformers' save_pretrained")


def safe_open(path: Path, framework: str):
    """safetensors' `safe_open` of `path`; ConfigError naming the file when it is truncated or damaged."""
    from safetensors import SafetensorError
    from safetensors import safe_open as open_

    try:
        return open_(str(path), framework=framework)
    except SafetensorError as e:
        raise damaged(path, e) from None


def weight_files(hf_dir: Path, listing: list[str] | None = None) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index when there is one). `listing`: the
    folder's file names when `hf_dir` holds only a copy of its safetensors files (a gs:// folder)."""
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
        names = listing if listing is not None else [p.name for p in hf_dir.iterdir()]
        others = sorted(n for n in names if Path(n).suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = (f" (found {', '.join(others)}: load and re-save them with transformers' save_pretrained)"
                if others else "")
        raise FileNotFoundError(f"no *.safetensors weights in {hf_dir}{hint}; vffn_jax reads safetensors only")
    out: dict[str, Path] = {}
    for path in files:
        with safe_open(path, "numpy") as f:
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
        path = self.files[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, "flax"))
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
        from safetensors import SafetensorError

        with jax.default_device(cpu) if cpu is not None else contextlib.nullcontext():
            try:
                return np.asarray(self._handle(name).get_tensor(name))
            except SafetensorError as e:
                raise damaged(self.files[name], e) from None


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


def _check_out(out) -> None:
    """`out` (an epath: local or gs://) is missing or an empty folder, and can be written."""
    from vffn_jax.checkpoint import manager as ckpt

    if out.exists():
        if out.is_dir() and ckpt.all_steps(out):
            raise ConfigError(f"--out={out} already holds checkpoints {ckpt.all_steps(out)}; import into a new folder")
        if not out.is_dir() or any(out.iterdir()):
            raise ConfigError(f"--out={out} already exists and is not an empty folder; import into a new or empty one")
    if storage.is_gcs(out):
        storage.check_writable(out, "--out")  # a missing bucket or missing rights: named before the weights are read
    elif not out.parent.is_dir():
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


def _tokenizer(hf_dir: Path, overrides: dict[str, Any], final_out):
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


class _Source:
    """The Hugging Face folder as local files: a local folder itself, or a gs:// folder's top-level files copied
    into the local temporary folder `local` (safetensors and tokenizers read local files): `fetch_config`
    brings the JSON and tokenizer files, `fetch_weights` the *.safetensors files once the config is checked."""

    SMALL_SUFFIXES = (".json", ".model", ".jinja", ".txt")

    def __init__(self, label: str, local: Path, remote=None):
        self.label = label  # the folder as messages and the import record name it
        self.local = local
        self.remote = remote
        self._objects: dict[str, int] | None = None

    @classmethod
    def local_folder(cls, hf_dir) -> "_Source":
        path = Path(os.path.abspath(os.path.expanduser(str(hf_dir))))
        return cls(str(path), path)

    @property
    def name(self) -> str:
        return self.remote.name if self.remote is not None else self.local.name

    def listing(self) -> list[str] | None:
        """The folder's file names (None for a local folder: weight_files lists it itself)."""
        return None if self.remote is None else sorted(self._list())

    def _list(self) -> dict[str, int]:
        """{file name: size} of the gs:// folder's top-level objects; FileNotFoundError when it has none."""
        if self._objects is None:
            key = storage.gcs_key(self.remote).rstrip("/")
            try:
                entries = storage.gcs_fs().ls(key, detail=True)
            except FileNotFoundError:
                entries = []
            except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types; all mean "cannot read"
                bucket = key.split("/", 1)[0]
                raise ConfigError(f"--hf={self.label}: cannot read it ({type(e).__name__}: {str(e).strip()[:300]}); "
                                  f"check that bucket gs://{bucket} exists and that this machine's credentials may "
                                  "read it (gcloud auth application-default login)") from None
            self._objects = {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
                             if e.get("type") == "file" and e["name"].rstrip("/") != key}
            if not self._objects:
                raise FileNotFoundError(f"--hf={self.label}: no such folder (no objects under it); point it at a "
                                        "Hugging Face model folder (config.json + *.safetensors)")
        return self._objects

    def _fetch(self, names: list[str]) -> None:
        if not names:
            return
        fs = storage.gcs_fs()
        fs.get([f"{storage.gcs_key(self.remote).rstrip('/')}/{n}" for n in names], [str(self.local / n) for n in names])

    def fetch_config(self) -> None:
        if self.remote is not None:
            self._fetch([n for n in self._list() if n.endswith(self.SMALL_SUFFIXES) or n in TOKENIZER_FILES])

    def fetch_weights(self) -> None:
        if self.remote is not None:
            self._fetch([n for n in self._list() if n.endswith(".safetensors")])

    def renamed(self, e: BaseException) -> BaseException:
        """`e` with the temporary copy's path replaced by the gs:// folder's, so the message names what the user gave."""
        text = str(e).replace(str(self.local), self.label)
        try:
            return type(e)(text)
        except TypeError:
            return ConfigError(text)


def import_hf(hf_dir, out, *, variant: str | None = None, overrides: dict[str, Any] | None = None,
              dtype: str | None = None, devices=None) -> dict:
    """Writes the run directory `out` (local or gs://) from the Hugging Face folder `hf_dir` (local or gs://);
    returns a summary. ConfigError / FileNotFoundError for bad input, raised before anything is written."""
    overrides = dict(overrides or {})
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}: choose one of {DTYPES}")
    out = storage.as_path(out)  # ConfigError for a malformed gs:// path
    if not storage.is_gcs(hf_dir):
        return _import(_Source.local_folder(hf_dir), out, variant, overrides, dtype, devices)
    remote = storage.as_path(hf_dir)
    with tempfile.TemporaryDirectory(prefix="vffn-hf-import-") as tmp:
        source = _Source(str(remote), Path(tmp), remote)
        try:
            return _import(source, out, variant, overrides, dtype, devices)
        except (ConfigError, FileNotFoundError) as e:
            raise source.renamed(e) from None


def _import(source: _Source, out, variant, overrides, dtype, devices) -> dict:
    import jax

    from vffn_jax.hf import hf_config
    from vffn_jax.hf.weights import params_from_hf

    hf_dir = source.local
    source.fetch_config()
    hf = hf_config.load(hf_dir)
    hf_config.overrides(hf)  # refuse an unsupported architecture before touching (or downloading) the weights
    _check_out(out)
    source.fetch_weights()
    files = weight_files(hf_dir, source.listing())
    tok_spec, tok = _tokenizer(hf_dir, overrides, out)
    notes: list[str] = []
    with TensorReader(files) as reader:
        source_dtype = _source_dtype(reader, [n for n in files if not n.endswith("rotary_emb.inv_freq")])
        cfg = build_config(hf, name=source.name, variant=variant, overrides=overrides, tokenizer=tok_spec,
                           eos_id=None if "model.eos_id" in overrides else tok.eos_id,
                           param_dtype=dtype or source_dtype)
        m = cfg.model
        check_model_fits(tok, m, source=f"{source.label} (config.json vocab_size, tokenizer.json)")
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
    copied_tok = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    info = {"hf_dir": source.label, "out": str(out), "model_type": hf.get("model_type"), "ffn": m.ffn,
            "variant": cfg.variant, "param_dtype": m.param_dtype, "source_dtype": source_dtype,
            "n_params": int(sum(x.size for x in jax.tree.leaves(state))), "copied": copied, "fresh": fresh,
            "ignored": ignored, "tokenizer": cfg.data.tokenizer, "tokenizer_files": copied_tok,
            "eos_id": m.eos_id, "seq_len": cfg.train.seq_len, "notes": notes}
    record = json.dumps({**info, "hf_config": hf}, indent=2) + "\n"
    if storage.is_gcs(out):  # written in place, like a training workdir; removed again on failure (it was empty)
        try:
            _write_run(out, cfg, state, hf_dir, copied_tok, record)
        except BaseException:
            with contextlib.suppress(Exception):
                if out.exists():
                    out.rmtree()
            raise
        return info
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_run(storage.as_path(tmp), cfg, state, hf_dir, copied_tok, record)
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


def _write_run(dest, cfg, state, hf_dir: Path, tokenizer_files: list[str], record: str) -> None:
    """The run directory's files at `dest` (an epath, local or gs://): config.json, checkpoint 0 (params only),
    the tokenizer files and the import record."""
    import jax

    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.rundir import RunDir

    tok_dir = dest / TOKENIZER_DIR
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_files:
        (tok_dir / f).write_bytes((hf_dir / f).read_bytes())
    (dest / IMPORT_RECORD).write_text(record)
    RunDir.at(dest).prepare(cfg, is_main=jax.process_index() == 0)
    manager = ckpt.make_manager(dest, cfg.run)
    ckpt.save(manager, 0, state, None, force=True)
    ckpt.wait_until_finished(manager)
    manager.close()


def _dense(m):
    """The checkpoint's own model: the same shapes with the dense FFN (what a Llama's tensors fill)."""
    return dataclasses.replace(m, ffn="dense")
