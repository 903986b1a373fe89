"""One mapping from the errors a command line can end with to its exit status and one-line message.

2: bad input — an invalid config or flag, a missing path or bucket, a damaged checkpoint (the message
names the field or file and the fix); 3: a checkpoint that does not match the config, or a run that
diverged. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys


def exit_status(e: BaseException) -> int | None:
    """The error class's own `exit_status` (ConfigError, CheckpointDamagedError: 2; CheckpointMismatchError,
    TrainingDivergedError: 3), 2 for a missing file or module, None for anything else (a bug)."""
    status = getattr(type(e), "exit_status", None)
    if status is not None:
        return status
    if isinstance(e, (FileNotFoundError, ModuleNotFoundError)):
        return 2
    return None


def report(e: BaseException, hint: str = "") -> int:
    """Prints `error: ...` on stderr and returns the exit status; re-raises an unexpected error."""
    status = exit_status(e)
    if status is None:
        raise e
    print(f"error: {e}{hint}", file=sys.stderr)
    return status
