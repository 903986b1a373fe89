"""What every command line shares: quiet start-up, the multi-process flags and initialisation, output from
process 0 only, and errors turned into exit statuses from the one table (`vffn_jax.errors`).

`run(body)` calls `body()` and maps a known error to `error: ...` on stderr plus its status; `console(main)` is
the entry of every console script and root shim (Ctrl-C before a command installs its own handling exits 130
without a traceback).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from vffn_jax import errors


def quiet_startup() -> None:
    """No absl/Orbax INFO lines on the terminal (the run directory keeps what matters)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose `--help` shows the command's module docstring as written."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """The multi-process flags shared by the commands that run a model (train, eval, generate)."""
    g = p.add_argument_group(
        "multi-process launch",
        "With none of these flags the cluster is auto-detected (TPU pod slices, SLURM, Open MPI, GKE, or "
        "JAX_COORDINATOR_ADDRESS); otherwise the run is a single process.")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, which hosts the coordination service (same value on every process)")
    g.add_argument("--num-processes", type=int, metavar="N", help="total number of processes")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    g.add_argument("--init-timeout", type=int, default=300, metavar="SECONDS",
                   help="give up start-up with an error if not every process has joined within this time "
                        "(default 300)")
    g.add_argument("--heartbeat-timeout", type=int, default=60, metavar="SECONDS",
                   help="a process whose heartbeats stop this long is lost: every other process prints what was "
                        "lost and exits 75 (re-run the same command; vffn-supervise does). A failed collective "
                        "with a dead process is noticed at once (default 60)")


def distributed_args(args: argparse.Namespace):
    """The checked multi-process launch of `add_distributed_arguments`' flags (ConfigError naming the flag)."""
    from vffn_jax.parallel import distributed

    return distributed.from_flags(args.coordinator, args.num_processes, args.process_id, args.init_timeout,
                                  args.heartbeat_timeout)


def add_overrides_argument(p: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable, into `args.overrides`) of the commands that restore a run (eval, generate)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="how the restored run executes (repeatable): model.depth_exec=compact|masked|auto, "
                        "model.depth_block=ROWS, model.attention=auto|xla|splash|cudnn, model.dtype=float32|"
                        "bfloat16; other keys are an error (the run's shapes are its own)")


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def say(text: str, *, file=None) -> None:
    """Prints from process 0 only (every process of a multi-host run executes the same command)."""
    if is_main_process():
        print(text, file=file or sys.stdout, flush=True)


def run(body: Callable[[], int], hint: Callable[[BaseException], str] | None = None) -> int:
    """`body()`'s status; a known error (bad input, damage, mismatch) becomes `error: ...` and its status from
    `vffn_jax.errors`; anything else is a bug and propagates with its traceback."""
    try:
        return body()
    except Exception as e:
        return report(e, hint(e) if hint else "")


def report(e: Exception, hint: str = "") -> int:
    """`errors.report(e)`, except that a failed exchange with a lost process of a multi-process run ends this one
    as parallel/peer_loss.py says (one line, exit 75) instead of a traceback."""
    from vffn_jax.parallel import peer_loss

    if peer_loss.is_peer_failure(e):
        peer_loss.lost_in(e)
    return errors.report(e, hint)


def console(main: Callable[[], int], interrupted: str = "interrupted (Ctrl-C)") -> NoReturn:
    """The entry of a console script or root shim: exits with `main()`'s status. Ctrl-C before the command
    installed its own handling (or after it ended) prints `vffn_jax: <interrupted>` and exits 130."""
    try:
        status = main()
        from vffn_jax.parallel import peer_loss

        peer_loss.leaving(status or 0)  # a multi-process run leaves together, with this status
        sys.exit(status)
    except KeyboardInterrupt:
        print(f"\nvffn_jax: {interrupted}", file=sys.stderr, flush=True)
        sys.exit(errors.EXIT_INTERRUPTED)
