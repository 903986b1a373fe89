"""Token-shard verification across real processes (vffn_jax/data/shard_reader.py): the sha256 pass is split over
the job's processes and every process raises the same error."""
import numpy as np

from tests.unit.data.corpora import shard_arrays, write_corpus
from vffn_jax.testing.processes import run_in_processes


def check_train_shards(folder: str):
    """In each process: check the train shards of `folder`; ("OK" | "ERR", error type, message, shards hashed
    by this process)."""
    from vffn_jax.data import shard_reader as shards
    from vffn_jax.data.manifest import read_manifest

    m = read_manifest(folder)
    try:
        shards.check_shards(m, m.split_shards("train"))
        return "OK", None, "", shards.LAST_VERIFY["shards"]
    except Exception as e:  # noqa: BLE001 - returned to the test
        return "ERR", type(e).__name__, str(e), shards.LAST_VERIFY["shards"]


def test_sha256_is_split_over_processes_and_every_process_raises(tmp_path):
    rng = np.random.default_rng(5)
    write_corpus(tmp_path / "c", {"train": shard_arrays(rng, [100, 100, 100, 100])})
    bad = tmp_path / "c" / "train-0001.bin"  # shards[1::2] are process 1's
    bad.write_bytes(bytes(bad.stat().st_size))
    outs = run_in_processes(check_train_shards, 2, str(tmp_path / "c"), devices_per_process=1, timeout=120)
    for status, kind, message, hashed in outs:
        assert (status, kind) == ("ERR", "ConfigError"), outs
        assert message.startswith("shard") and "train-0001.bin: its sha256 differs" in message, outs
        assert hashed == 2  # each process hashed 2 of the 4 shards
