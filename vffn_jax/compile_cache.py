"""JAX's persistent compilation cache, kept beside the run so a restarted job does not recompile.

`run.compile_cache`: "auto" (default) uses `<workdir>/compile_cache` (a `gs://` workdir too: JAX reads
and writes the cache through etils.epath) unless a cache folder is already configured for this
process (JAX_COMPILATION_CACHE_DIR or `jax.config`), which then wins; "off" disables it; anything
else is the cache folder itself, which training checks it can write at start-up (`check`: exit 2 naming
run.compile_cache; JAX itself would only warn and compile every program again).
"""
from __future__ import annotations

import jax

from vffn_jax import storage
from vffn_jax.errors import ConfigError
from vffn_jax.rundir import RunDir

MIN_COMPILE_SECONDS = 1.0  # programs that compile faster are not worth a round trip to a bucket


def check(setting: str) -> None:
    """ConfigError naming run.compile_cache and the fix when the folder it names cannot be created and written
    (a path under a file, a read-only folder, a missing bucket). "auto" (the workdir's own folder, checked with
    the workdir) and "off" need no check."""
    if setting in ("auto", "off"):
        return
    try:
        storage.check_writable(setting, "run.compile_cache")
    except ConfigError as e:
        raise ConfigError(f"{e}; or set run.compile_cache=auto (<workdir>/compile_cache) or off") from None


def enable(setting: str, workdir) -> str | None:
    """Points JAX's persistent cache at the folder `setting` names; returns it (None when off)."""
    if setting == "off":
        return None
    current = jax.config.jax_compilation_cache_dir
    if setting == "auto":
        if current:
            return current
        folder = str(RunDir.at(workdir).compile_cache)
    else:
        folder = str(storage.as_path(setting))
    if folder != current:
        jax.config.update("jax_compilation_cache_dir", folder)
        if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_SECONDS:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return folder
