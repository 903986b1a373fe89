"""Storage (vffn_jax/storage.py) as train.py meets it: a gs:// workdir in a bucket that does not exist is
refused at start-up (a real fake-gcs-server on 127.0.0.1)."""
import time

import train
from vffn_jax import storage
from vffn_jax.testing.processes import free_port
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


def test_unreachable_storage_is_refused_in_seconds(tmp_path, monkeypatch):
    """No Cloud Storage endpoint to talk to (here: an emulator address nothing listens on; on a VM: no network or
    DNS): exit 2 naming the path within 15 s, instead of gcsfs retrying for a minute and a half."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(storage, "_REACHED", set())
    for flag, value in (("--set", "data.path=gs://some-bucket/corpus"), ("--workdir", "gs://some-bucket/run")):
        t0 = time.perf_counter()
        args = ["--workdir", str(tmp_path / "run")] if flag == "--set" else []
        res = call(train.main, *args, flag, value, "--no-progress", *tiny_args())
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert value.split("=")[-1] in res.stderr and "cannot reach Cloud Storage at 127.0.0.1" in res.stderr
        assert time.perf_counter() - t0 < 15
