"""What a surviving process says was lost (vffn_jax/parallel/peer_loss.py), from the errors it meets. The losses
themselves, with real processes and `kill -9`: tests/integration/train/test_supervise.py."""
import pytest

from vffn_jax.parallel import peer_loss


@pytest.fixture
def as_process(monkeypatch):
    def set_(index: int, n: int):
        monkeypatch.setattr(peer_loss.progress, "process_index", index)
        monkeypatch.setattr(peer_loss.progress, "num_processes", n)
        monkeypatch.setattr(peer_loss.progress, "coordinator", "10.0.0.2:1234")
    return set_


def test_what_was_lost_is_named_from_the_error(as_process):
    as_process(2, 4)
    service = "UNAVAILABLE: The following tasks are unhealthy: /job:jax_worker/replica:0/task:3 /job:jax_worker/replica:0/task:2"
    assert peer_loss.describe(service) == "process 3"  # this process (2) is not the lost one
    assert peer_loss.describe("RPC: /xla.coordination.CoordinationService/Heartbeat timed out") == \
        "the coordinator (process 0 at 10.0.0.2:1234)"
    assert peer_loss.describe("Gloo: Connection reset by peer [10.0.0.7]:40123 at 12:30:01") == \
        "a peer process (at 10.0.0.7:40123)"
    as_process(0, 2)
    assert peer_loss.describe("Gloo: Connection reset by peer") == "process 1"  # the only other one
    as_process(1, 2)
    assert peer_loss.describe("failed to connect to 10.0.0.2:1234") == "the coordinator (process 0 at 10.0.0.2:1234)"


def test_only_a_failed_exchange_of_a_multi_process_run_is_a_lost_peer(as_process):
    gloo = RuntimeError("INTERNAL: Gloo all-reduce failed: Connection closed by peer [127.0.0.1]:5000")
    as_process(0, 1)
    assert not peer_loss.is_peer_failure(gloo)  # one process has no peers
    as_process(0, 2)
    assert peer_loss.is_peer_failure(gloo)
    assert not peer_loss.is_peer_failure(ValueError("model.top_k=99 must be <= model.n_experts"))
