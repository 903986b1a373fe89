"""A corpus tokenised once (python -m vffn_jax.data tokenize) trains from its manifest: on a local disk
and from a bucket (a real fake-gcs-server), with the same losses, across a stop and a resume."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax import storage
from vffn_jax.data import tokenize_corpus
from vffn_jax.train import loop as trainer
from vffn_jax.config import ConfigError, load_config

SMALL = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2, "model.d_ff": 128,
         "train.batch_size": 8, "train.seq_len": 32, "train.steps": 4, "run.log_every": 1,
         "run.ckpt_every": 2, "run.eval_every": 0, "run.eval_batches": 2}


def _corpus_files(tmp_path) -> Path:
    """A few real documents: some standard-library modules as .jsonl."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [{"text": (root / name).read_text()} for name in ("abc.py", "bisect.py", "colorsys.py", "keyword.py")]
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs * 3))
    return folder


def _losses(workdir) -> dict[int, float]:
    text = (storage.as_path(workdir) / "metrics.jsonl").read_text()
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


def _train_twice(corpus, workdir, cache):
    cfg = load_config("tiny", "versatile", {**SMALL, "data.path": str(corpus), "data.cache_dir": str(cache)})
    trainer.train(cfg, workdir, progress=False, stop_at=2)
    summary = trainer.train(cfg, workdir, progress=False)  # the same call resumes
    assert ckpt.all_steps(workdir) == [2, 4]
    return _losses(workdir), summary["eval"]["loss"]


def test_tokenised_corpus_trains_locally_and_from_a_bucket(tmp_path, gcs_bucket):
    raw = _corpus_files(tmp_path)
    args = ["--input", str(raw), "--tokenizer", "byte", "--shard-tokens", "20000", "--validation-fraction", "0.2",
            "--workers", "1", "--quiet"]
    assert tokenize_corpus.main([*args, "--output", str(tmp_path / "corpus")]) == 0
    assert tokenize_corpus.main([*args, "--output", f"{gcs_bucket}/corpus"]) == 0

    local = _train_twice(tmp_path / "corpus", tmp_path / "run", tmp_path / "cache_a")
    remote = _train_twice(f"{gcs_bucket}/corpus", f"{gcs_bucket}/run", tmp_path / "cache_b")
    assert sorted(local[0]) == [1, 2, 3, 4]
    assert local == remote
    assert not list((tmp_path / "cache_b").rglob("*.bin")), "nothing is tokenised or copied at train time"

    with pytest.raises(ConfigError, match="model.vocab_size=200 is smaller"):
        cfg = load_config("tiny", "versatile", {**SMALL, "data.path": str(tmp_path / "corpus"),
                                                "model.vocab_size": 200})
        trainer.train(cfg, tmp_path / "small_vocab", progress=False)
