"""One mapping from the errors a command line can end with to its exit status and one-line message.

2: bad input — an invalid config or flag, a missing path or bucket, a damaged checkpoint (the message
names the field or file and the fix); 3: a checkpoint that does not match the config, or a run that
diverged. Anything else is a bug and keeps its traceback. The statuses a run ends with by design, not
by an error, are defined next to them below (4 and 75 live beside their code: parallel/distributed.py, train/loop.py).
"""
from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it): the step reached was saved; re-run to resume
EXIT_HUNG = 86  # run.hang_minutes passed without a finished step: thread stacks in WORKDIR/hang-<process>.txt


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
