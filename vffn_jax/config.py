"""The run configuration: the sections composed, presets, `--set` overrides, the cross-section and device
checks, and the format version of a saved `config.json`.

A run's config is `scale preset ∘ variant preset ∘ --set overrides`. Presets are partial JSON files in the
repository's `configs/` folder (`configs/scales/*.json`, `configs/variants/*.json`; an installed package carries
the same files as `vffn_jax/presets/`); `--config` also accepts a path to a full or partial JSON file, e.g. a
saved `config.json`. Each section lives beside the code it configures and validates itself: `model.*`
(vffn_jax/model/config.py), `train.*` and `run.*` (vffn_jax/train/config.py), `data.*` (vffn_jax/data/config.py),
`mesh.*` (vffn_jax/parallel/mesh.py). `config.json` carries `format_version`; `migrate` turns what an older
version wrote into today's keys, so run directories keep loading after a key moves (add it to `MIGRATIONS`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, get_type_hints

from vffn_jax.data.config import DataConfig
from vffn_jax.errors import ConfigError
from vffn_jax.model.config import (ATTENTION_KINDS, DEPTH_KINDS, EXPERT_KINDS, FFN_KINDS, REMAT_POLICIES,
                                   VIRTUAL_EXPERT_KINDS, ModelConfig)
from vffn_jax.parallel.mesh import MeshConfig, resolve_mesh_shape, resolve_mesh_shapes
from vffn_jax.train.config import RunConfig, TrainConfig, tau_at, tau_decay_per_step

__all__ = [  # the sections and their facts, re-exported: `from vffn_jax.config import ModelConfig` keeps working
    "ATTENTION_KINDS", "CONFIGS_DIR", "Config", "ConfigError", "DEPTH_KINDS", "DataConfig", "EXPERT_KINDS", "FFN_KINDS",
    "FORMAT_VERSION", "MeshConfig", "ModelConfig", "REMAT_POLICIES", "RunConfig", "TrainConfig", "VIRTUAL_EXPERT_KINDS",
    "apply_overrides", "available", "config_from_dict", "load_config", "migrate", "parse_set_args",
    "resolve_mesh_shape", "resolve_mesh_shapes", "tau_at", "tau_decay_per_step", "validate"]


def _configs_dir() -> Path:
    """Where the presets are: `vffn_jax/presets/` in an installed package (pyproject.toml ships the
    repository's `configs/` folder there as package data), else `configs/` beside the package (a checkout)."""
    packaged = Path(__file__).resolve().parent / "presets"
    if (packaged / "scales").is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


CONFIGS_DIR = _configs_dir()


CONFIGS_DIR = _configs_dir()

# config.json's format: 1 = no `format_version` key (vffn_jax before the sections moved beside their code); 2 = now
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()
    scale: str = ""  # informational: the preset names this config came from
    variant: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """config.json: the sections plus `format_version`."""
        return json.dumps({"format_version": FORMAT_VERSION, **self.to_dict()}, indent=2, sort_keys=True)


# --------------------------------------------------------------------------- format versions


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had the same keys; only the version field is new."""
    return data


# version N -> a function turning a version-N dict into version N+1 (renamed or moved keys go here)
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def migrate(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """`data` (a saved config.json or a partial config) in today's keys, without `format_version`. A version
    newer than this vffn_jax's is a ConfigError naming `source`."""
    data = dict(data)
    version = data.pop("format_version", 1)
    if not isinstance(version, int) or version < 1:
        raise ConfigError(f"{source}: format_version={version!r} must be an integer >= 1")
    if version > FORMAT_VERSION:
        raise ConfigError(f"{source} was written by a newer vffn_jax (config format {version}; this one reads up to "
                          f"{FORMAT_VERSION}): upgrade vffn_jax to use it")
    while version < FORMAT_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    return data


# --------------------------------------------------------------------------- overrides


def _coerce(value: Any, typ: type, key: str) -> Any:
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def apply_overrides(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """Returns `cfg` with nested `{"section": {"field": v}}` or dotted `{"a.b": v}` overrides applied."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            flat.setdefault(head, {})[rest] = value
        else:
            flat[head] = value if not isinstance(value, dict) else {**flat.get(head, {}), **value}
    hints = get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in flat.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = sorted(n for n in names if n[:3] == key[:3])
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            known = ", ".join(sorted(prefix + n for n in names))
            raise ConfigError(f"unknown config key {full!r}{hint}; known keys here: {known}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: is a section; set its fields, e.g. {full}.<field>=...")
            changes[key] = apply_overrides(current, value, prefix=f"{full}.")
        else:
            changes[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(cfg, **changes)


def parse_set_args(items: list[str]) -> dict[str, Any]:
    """`["model.d_model=64", ...]` -> `{"model.d_model": "64"}` (values coerced later by type)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (e.g. model.d_model=256), got {item!r}")
        out[key.strip()] = value
    return out


def _preset(kind: str, name: str) -> dict[str, Any]:
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            return migrate(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
    path = CONFIGS_DIR / kind / f"{name}.json"
    if not path.exists():
        choices = sorted(p.stem for p in (CONFIGS_DIR / kind).glob("*.json"))
        raise ConfigError(f"unknown {kind[:-1]} {name!r}; choose one of {choices} or pass a .json path")
    return json.loads(path.read_text())


def available(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / kind).glob("*.json"))


def load_config(scale: str = "tiny", variant: str | None = "versatile", overrides: dict[str, Any] | None = None) -> Config:
    """Composes a scale preset (or JSON file), a variant preset and overrides; validates the result."""
    cfg = Config()
    base = _preset("scales", scale)
    cfg = apply_overrides(cfg, base)
    if variant:
        cfg = apply_overrides(cfg, _preset("variants", variant))
    names = {"scale": base.get("scale", Path(scale).stem), "variant": variant or cfg.variant or cfg.model.ffn}
    cfg = dataclasses.replace(cfg, **names)
    cfg = apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """A Config from a saved config.json's dict (any format version) or a partial dict; validated."""
    cfg = apply_overrides(Config(), migrate(data, source))
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def validate(cfg: Config, n_devices: int | None = None, n_slices: int | None = None,
             platform: str | None = None) -> None:
    """ConfigError naming the field and the fix: each section's checks, the cross-section ones, then (given
    `n_devices` / `platform`: cpu, gpu, tpu) the mesh and shapes against the devices, the kernels against them."""
    for section in (cfg.model, cfg.train, cfg.data, cfg.mesh, cfg.run):
        section.validate()
    if platform is not None:
        cfg.model.validate_platform(platform)
    m, t = cfg.model, cfg.train
    if m.attention == "splash" and cfg.train.seq_len % 128:
        raise ConfigError(f"model.attention=splash needs train.seq_len a multiple of 128 (the kernel's smallest tile), "
                          f"got {cfg.train.seq_len}")
    if m.doc_mask and not 0 <= m.eos_id < m.vocab_size:
        raise ConfigError(f"model.doc_mask=true needs model.eos_id, the tokenizer's EOS id in 0..model.vocab_size-1 "
                          f"(got {m.eos_id}; the byte tokenizer's is 256)")
    if m.doc_mask and cfg.data.tokenizer == "byte" and m.eos_id != 256:
        raise ConfigError(f"model.eos_id={m.eos_id} but the byte tokenizer's EOS id is 256; set model.eos_id=256")
    if n_devices is not None:
        data, fsdp, tensor = resolve_mesh_shape(cfg.mesh, n_devices, n_slices)
        if t.batch_size % (data * fsdp):
            raise ConfigError(
                f"train.batch_size={t.batch_size} is not divisible by the data-parallel size "
                f"mesh.data*mesh.fsdp={data * fsdp}; use a multiple of {data * fsdp}")
        if t.batch_size % (t.grad_accum * data * fsdp):
            raise ConfigError(
                f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum} x the "
                f"data-parallel size mesh.data*mesh.fsdp={data * fsdp}: every device needs the same number of rows "
                f"in each microbatch; use a batch_size multiple of {t.grad_accum * data * fsdp} or a smaller grad_accum")
        if m.d_ff % tensor or m.n_heads % tensor or m.kv_heads % tensor or m.vocab_size % tensor:
            raise ConfigError(
                f"mesh.tensor={tensor} must divide model.d_ff={m.d_ff}, model.n_heads={m.n_heads}, the key/value "
                f"heads (model.n_kv_heads: {m.kv_heads}) and model.vocab_size={m.vocab_size}")
        if m.ffn in VIRTUAL_EXPERT_KINDS and m.n_experts % tensor:
            # f is sharded over tensor in contiguous blocks: E % T == 0 puts E/T whole experts on each device
            raise ConfigError(
                f"model.n_experts={m.n_experts} is not divisible by the tensor-parallel size {tensor} "
                f"(mesh.tensor x mesh.dcn_tensor): each virtual expert's hidden units must live on one device. "
                f"Use a tensor size dividing {m.n_experts}, or set model.n_experts to a multiple of {tensor}")
        if m.ffn == "moe" and (m.d_ff // m.n_experts) % tensor:
            raise ConfigError(
                f"mesh.tensor={tensor} must divide each moe expert's hidden width model.d_ff/model.n_experts="
                f"{m.d_ff // m.n_experts} (expert hidden units are sharded over tensor); "
                "change mesh.tensor or model.n_experts")


