"""The error types a command line ends with, and the one table of exit statuses.

Below every other module of the package (it imports nothing of ours), so that each subsystem's own config
section and validation can raise `ConfigError` without importing the configuration that composes them.
A bad-input error's message names the field or file and the fix; `report` prints it as one line
(`error: ...`) and returns its status. Anything not in this table is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_CRASH = 1  # an unexpected error (a bug): Python's own status, with its traceback
EXIT_BAD_INPUT = 2  # an invalid config, flag, path, bucket, corpus, or a damaged checkpoint: fix the input
EXIT_MISMATCH = 3  # a checkpoint that does not match the config, or a run that diverged: do not restart as is
EXIT_PEERS_MISSING = 4  # start-up timed out waiting for every process at the coordinator
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a preemption notice after saving; re-run the same command
EXIT_PEER_LOST = EXIT_PREEMPTED  # another process of the run died or became unreachable: re-run the same command
EXIT_HUNG = 86  # run.hang_minutes passed without a finished step: thread stacks in WORKDIR/hang-<process>.txt
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it): the step reached was saved; re-run to resume

EXIT_STATUSES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_CRASH: "crashed (a bug: the traceback says where)",
    EXIT_BAD_INPUT: "bad input or a damaged checkpoint (the message names the field or file and the fix)",
    EXIT_MISMATCH: "a checkpoint that does not match the config, or a diverged run",
    EXIT_PEERS_MISSING: "not every process joined the coordinator in time",
    EXIT_PREEMPTED: "preempted after saving, or a peer process was lost: re-run the same command",
    EXIT_HUNG: "hung: no step finished in run.hang_minutes; re-run to resume",
    EXIT_INTERRUPTED: "interrupted by the user (Ctrl-C)",
}
# What a supervisor (`vffn-supervise`) re-runs: the run itself is sound and the same command resumes it from its
# newest intact checkpoint. A process killed by a signal (the OOM killer, kill -9, a native abort) is restarted
# too; everything else needs a person: a fixed input, a new config, or a bug fixed.
RESTARTABLE = (EXIT_PEERS_MISSING, EXIT_PREEMPTED, EXIT_HUNG)


class ConfigError(ValueError):
    """An invalid or inconsistent configuration; the message names the field and the fix."""

    exit_status = EXIT_BAD_INPUT


class InputError(ConfigError):
    """Bad input data: a file, document, corpus, bucket or tokenizer that cannot be used as given. The message
    names the file (and line / record / byte) and the fix."""


def exit_status(e: BaseException) -> int | None:
    """The error class's own `exit_status` (ConfigError, CheckpointDamagedError: 2; CheckpointMismatchError,
    TrainingDivergedError: 3), 2 for a missing file or module, None for anything else (a bug)."""
    status = getattr(type(e), "exit_status", None)
    if status is not None:
        return status
    if isinstance(e, (FileNotFoundError, ModuleNotFoundError)):
        return EXIT_BAD_INPUT
    return None


def report(e: BaseException, hint: str = "") -> int:
    """Prints `error: ...` on stderr and returns the exit status; re-raises an unexpected error."""
    status = exit_status(e)
    if status is None:
        raise e
    print(f"error: {e}{hint}", file=sys.stderr)
    return status
