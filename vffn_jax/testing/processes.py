"""Real processes for the tests that need one: one environment every child inherits, a script runner, and
`run_in_processes`, which runs a *function* in N local processes joined by `jax.distributed` on 127.0.0.1
(as OLMo-core's `run_distributed_test` does), instead of a command line per test.

The child environment is the test session's own (`tests/conftest.py` exports the persistent compile cache, the
data cache and a private HOME), with `JAX_PLATFORMS=cpu`, the requested number of fake CPU devices and the
checkout on `PYTHONPATH`.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]  # the checkout (root scripts train.py, eval.py, generate.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for a child: CPU only, `devices` fake devices, the checkout importable."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": path, **extra}


def run_script(args: Sequence[str], *, devices: int = 1, timeout: float = 300, env: dict | None = None,
               **kw) -> subprocess.CompletedProcess:
    """`python ARGS...` in the checkout (e.g. `["train.py", ...]`), output captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env={**child_env(devices), **(env or {})},
                          capture_output=True, text=True, timeout=timeout, **kw)


def run_in_processes(fn: Callable[..., Any], n: int, *args, devices_per_process: int = 2, timeout: float = 240,
                     init_timeout: int = 60) -> list[Any]:
    """Runs `fn(*args)` in `n` local processes joined by `jax.distributed.initialize` on 127.0.0.1 and returns
    each process's return value (index = process id). `fn` must be importable by name (a module-level
    function); its arguments and result are pickled. A process that fails or outlives `timeout` fails the call
    with every process's output."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vffn-procs-") as tmp:
        call_file = Path(tmp) / "call.pkl"
        call_file.write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, args)))
        procs = [subprocess.Popen([sys.executable, "-m", "vffn_jax.testing.processes", str(call_file), str(port),
                                   str(i), str(n), str(init_timeout), str(Path(tmp) / f"result_{i}.pkl")],
                                  cwd=ROOT, env=child_env(devices_per_process), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(n)]
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            outs = [p.communicate()[0] for p in procs]
            raise AssertionError(f"{n} processes did not finish in {timeout} s:\n" + _tails(outs))
        if any(p.returncode for p in procs):
            raise AssertionError(f"a process failed (exit statuses {[p.returncode for p in procs]}):\n" + _tails(outs))
        return [pickle.loads((Path(tmp) / f"result_{i}.pkl").read_bytes()) for i in range(n)]


def _tails(outs: list[str]) -> str:
    return "\n----\n".join(f"process {i}:\n{out[-3000:]}" for i, out in enumerate(outs))


def _child(call_file: str, port: str, pid: str, n: str, init_timeout: str, result_file: str) -> int:
    import importlib

    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(n), process_id=int(pid),
                               initialization_timeout=int(init_timeout))
    module, qualname, args = pickle.loads(Path(call_file).read_bytes())
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    try:
        result = fn(*args)
    except BaseException:
        traceback.print_exc()
        return 1
    Path(result_file).write_bytes(pickle.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:]))
