"""Multi-process start-up: `jax.distributed.initialize`, explicit or auto-detected, with a clear timeout.

* Explicit (GPU clusters, several processes on one machine): `--coordinator HOST:PORT
  --num-processes N --process-id I` on every process (process 0 hosts the coordinator).
* Auto-detected: with no flags, on a TPU pod slice, under SLURM/Open MPI, on GKE, or when
  `JAX_COORDINATOR_ADDRESS` is set, JAX reads the cluster's environment itself.
* Otherwise: one process, no initialisation.

A peer that never arrives makes JAX abort the process (SIGABRT) after its own timeout, with a log
line that is easy to miss. A watchdog here fires first: it prints which processes were expected
where and how to fix it, then exits with EXIT_PEER_TIMEOUT.

Once joined, a peer that is lost later (killed, hung, unreachable) ends the survivors through
parallel/peer_loss.py (one line, exit 75). `--heartbeat-timeout` bounds how long the coordination service
takes to notice a silent peer: JAX's 100 s default is made 60 s here, long enough for a pod's network blips
and for hosts that stall in a long compile (heartbeats come from a background thread), short enough that a
restart is not kept waiting; a failed collective is noticed at once, without waiting for it.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading

from vffn_jax.errors import EXIT_PEERS_MISSING, ConfigError
from vffn_jax.parallel import peer_loss

EXIT_PEER_TIMEOUT = EXIT_PEERS_MISSING
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300  # how long start-up waits for every peer
    heartbeat_timeout_s: int = 60  # a peer silent this long is lost (parallel/peer_loss.py)


def from_flags(coordinator: str | None, num_processes: int | None, process_id: int | None,
               init_timeout: int = 300, heartbeat_timeout: int = 60) -> DistributedArgs:
    """The explicit launch of `--coordinator --num-processes --process-id --init-timeout --heartbeat-timeout`,
    checked: all three or none (auto-detect), a process id in range, HOST:PORT. ConfigError naming the flag."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together: pass all three "
                          "(or none, to auto-detect the cluster)")
    if init_timeout < 1:
        raise ConfigError(f"--init-timeout={init_timeout} must be >= 1 second")
    if heartbeat_timeout < 2:
        raise ConfigError(f"--heartbeat-timeout={heartbeat_timeout} must be >= 2 seconds")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id={process_id} must be in 0..--num-processes-1 "
                              f"(--num-processes={num_processes})")
        if ":" not in coordinator:
            raise ConfigError(f"--coordinator={coordinator!r} must be HOST:PORT, e.g. 10.0.0.2:1234")
    return DistributedArgs(coordinator, num_processes, process_id, init_timeout, heartbeat_timeout)


def cluster_detected() -> bool:
    """Whether JAX would find a multi-process cluster environment by itself."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    try:  # jax's cluster registry is private; without it, fall back to explicit flags only
        from jax._src import clusters

        return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
                   if not getattr(env, "opt_in_only_method", False))
    except Exception:
        return False


def initialize(d: DistributedArgs, workdir=None) -> bool:
    """Joins the processes of a multi-process run; returns False for a single-process run. The native runtime's
    output then goes to a log file (beside `workdir`'s run when local), not the terminal (peer_loss.py)."""
    explicit = d.coordinator is not None
    if not explicit and not cluster_detected():
        return False
    import jax

    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=d.coordinator, num_processes=d.num_processes, process_id=d.process_id)
        host = d.coordinator.rsplit(":", 1)[0]
        if host in _LOOPBACK:  # a local test: keep the coordinator off every other interface
            kwargs["coordinator_bind_address"] = d.coordinator
    where = (f"{d.num_processes} processes at coordinator {d.coordinator} (this is process {d.process_id})"
             if explicit else "the processes of the auto-detected cluster")

    def give_up():
        print(f"error: start-up timed out after {d.timeout_s} s waiting for {where}. Check that every process "
              "was launched with the same --coordinator and --num-processes and a distinct --process-id, that "
              "process 0 is running and its port is reachable; raise --init-timeout for slow launches.",
              file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_TIMEOUT)

    # JAX's own timeout aborts the process; ours fires a few seconds earlier with a message.
    watchdog = threading.Timer(d.timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    # A failed process must not make the coordination service abort every other one (a native stack dump and
    # SIGABRT): with recoverability on it only marks the process lost, and peer_loss ends the survivors cleanly.
    jax.config.update("jax_enable_recoverability", True)
    peer_loss.redirect_native_output(peer_loss.native_log_path(workdir))
    peer_loss.catch_native_abort()
    try:
        jax.distributed.initialize(initialization_timeout=d.timeout_s + 30,
                                   heartbeat_timeout_seconds=d.heartbeat_timeout_s, **kwargs)
    finally:
        watchdog.cancel()
    peer_loss.watch_peers(d.coordinator, d.heartbeat_timeout_s)
    return True
