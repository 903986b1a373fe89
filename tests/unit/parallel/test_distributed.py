"""Multi-process launch flags (vffn_jax/parallel/distributed.py) as train.py reads them."""
import train
from vffn_jax.testing.cli import call


def test_partial_launch_flags_are_refused():
    """--coordinator, --num-processes and --process-id: one without the others is a usage error (exit 2)."""
    res = call(train.main, "--workdir", "x", "--num-processes", "2")
    assert res.returncode == 2 and "--coordinator, --num-processes and --process-id go together" in res.stderr
