"""Storage (vffn_jax/storage.py) as train.py meets it: a gs:// workdir in a bucket that does not exist is
refused at start-up (a real fake-gcs-server on 127.0.0.1)."""
import time

import train
from vffn_jax.testing.cli import call
from vffn_jax.testing.shapes import tiny_args


def test_missing_bucket_fails_at_startup(gcs_emulator):
    t0 = time.perf_counter()
    res = call(train.main, "--variant", "versatile", "--workdir", "gs://no-such-bucket-vffn/run", "--no-progress",
               *tiny_args())
    assert res.returncode == 2, res.stderr[-3000:]
    assert "--workdir=gs://no-such-bucket-vffn/run: cannot write there" in res.stderr
    assert "gs://no-such-bucket-vffn exists" in res.stderr
    assert "Traceback" not in res.stderr
    assert time.perf_counter() - t0 < 60
