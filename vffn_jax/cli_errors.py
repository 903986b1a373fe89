"""One mapping from the errors a command line can end with to its exit status and one-line message.

2: bad input — an invalid config or flag, a missing path or bucket, a damaged checkpoint (the message
names the field or file and the fix); 3: a checkpoint that does not match the config, or a run that
diverged. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys


def exit_status(e: BaseException) -> int | None:
    from vffn_jax.checkpoint import CheckpointDamagedError, CheckpointMismatchError
    from vffn_jax.config import ConfigError
    from vffn_jax.loop_actions import TrainingDivergedError

    if isinstance(e, (ConfigError, FileNotFoundError, ModuleNotFoundError, CheckpointDamagedError)):
        return 2
    if isinstance(e, (CheckpointMismatchError, TrainingDivergedError)):
        return 3
    return None


def report(e: BaseException, hint: str = "") -> int:
    """Prints `error: ...` on stderr and returns the exit status; re-raises an unexpected error."""
    status = exit_status(e)
    if status is None:
        raise e
    print(f"error: {e}{hint}", file=sys.stderr)
    return status
