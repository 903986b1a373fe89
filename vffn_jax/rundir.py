"""A run directory: its layout and the one place that reads and writes it."""
from __future__ import annotations

import json

from vffn_jax import storage
from vffn_jax.config import Config, ConfigError, config_from_dict


def prepare_workdir(cfg: Config, workdir, is_main: bool):
    """Checks the workdir can be written (a missing bucket fails here, before anything is compiled),
    refuses to resume a run whose model differs, and saves the resolved config beside the run."""
    path = storage.check_writable(workdir, "--workdir") / "config.json"
    if path.exists():
        saved = config_from_dict(json.loads(path.read_text()))
        if saved.model != cfg.model:
            diff = {k: (getattr(saved.model, k), getattr(cfg.model, k)) for k in saved.model.__dataclass_fields__
                    if getattr(saved.model, k) != getattr(cfg.model, k)}
            raise ConfigError(f"{workdir} holds a run with a different model (saved vs now: {diff}); "
                              "re-run with the same flags to resume, or use a new --workdir")
    if is_main:
        storage.write_text_atomic(path, cfg.to_json())
    return path.parent
