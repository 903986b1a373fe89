"""Command lines called in-process: `main(argv)` with stdout/stderr captured, the exit status returned.

Most command-line behaviour (exit statuses, messages, JSON output) needs no new interpreter; a real process
is kept for signals, kills, hangs, multi-process, platform/libtpu start-up and packaging.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Callable


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def call(main: Callable[[list[str]], int], *argv) -> Result:
    """Runs `main([str(a) for a in argv])` as the command line would, returning its status and output.
    A `SystemExit` (argparse's usage errors, `--help`) becomes the status, as in a real process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                err.write(e.code)
    return Result(int(rc or 0), out.getvalue(), err.getvalue())
