"""The run a server serves: parameters restored for inference (`checkpoint.restore.restore_params`, like
`generate.py`), the run's tokenizer, its context (`train.seq_len`), the model id clients name, and the chat
template when the tokenizer brings one (a `tokenizer_config.json` with a `chat_template` beside the tokenizer
file, as a Hugging Face import has; the byte tokenizer has none)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Served:
    model_id: str
    m: Any  # ModelConfig
    params: Any  # pure dict of (possibly sharded) arrays
    tokenizer: Any
    context: int
    mesh: Any
    workdir: str
    step: int
    chat_template: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def valid_vocab(self) -> int:
        return self.tokenizer.vocab_size


def default_model_id(workdir, step: int) -> str:
    """`vffn-<run folder name>-step<N>`: what /v1/models lists and requests name."""
    name = str(workdir).rstrip("/").split("/")[-1] or "run"
    return f"vffn-{name}-step{step}"


def find_chat_template(tokenizer_spec: str) -> str | None:
    """The chat template of `tokenizer_config.json` beside a local tokenizer file, or None."""
    if tokenizer_spec in ("byte", "olmo") or str(tokenizer_spec).startswith("gs://"):
        return None
    cfg_file = Path(tokenizer_spec).expanduser().parent / "tokenizer_config.json"
    try:
        template = json.loads(cfg_file.read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) and template.strip() else None


def load(workdir, step: int | None = None, overrides: dict | None = None, model_id: str | None = None) -> Served:
    """Restores the run (ConfigError / FileNotFoundError for bad input, as `generate.py`)."""
    from vffn_jax.checkpoint import restore
    from vffn_jax.data.tokenizer import check_model_fits, load_tokenizer
    from vffn_jax.model import kv_cache

    restored = restore.restore_params(workdir, step, overrides=overrides)
    cfg = restored.cfg
    tok = load_tokenizer(cfg.data.tokenizer)
    check_model_fits(tok, cfg.model, source=str(restored.workdir))
    return Served(model_id or default_model_id(restored.workdir, restored.step), cfg.model,
                  kv_cache.pure_params(restored.params), tok, cfg.train.seq_len, restored.setup.mesh,
                  str(restored.workdir), restored.step, find_chat_template(cfg.data.tokenizer))
