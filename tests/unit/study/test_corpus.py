"""The study's corpus (vffn_jax/study/corpus.py): the Python standard library's source, held out by file."""
from __future__ import annotations

import json

from vffn_jax.config import DataConfig
from vffn_jax.data import token_cache
from vffn_jax.study.corpus import build_stdlib_corpus


def test_stdlib_corpus_skips_non_utf8_and_site_packages(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages" / "x").mkdir(parents=True)
    body = "".join(f"line_{i} = {i}\n" for i in range(200))
    (root / "a.py").write_text("import os\n" + body)
    (root / "pkg" / "b.py").write_text("x = 'é'\n" + body)
    (root / "bad.py").write_bytes(b"# -*- coding: latin-1 -*-\ns = '\xe9'\n")
    (root / "empty.py").write_text("")
    (root / "site-packages" / "x" / "c.py").write_text("pass\n")
    (root / "data.txt").write_text("not python\n")
    (root / "pkg" / "long.py").write_text("".join(f"line_{i} = {i}\n" for i in range(400)))
    path, fraction = build_stdlib_corpus(tmp_path / "corpus", root=root, holdout_files=0.34,
                                               eval_chunk_chars=500)
    train_docs = [json.loads(line) for line in (path / "train" / "stdlib.jsonl").read_text().splitlines()]
    pieces = [json.loads(line) for line in (path / "validation" / "stdlib.jsonl").read_text().splitlines()]
    docs = train_docs + pieces
    files = {d["path"].split("#")[0] for d in docs}
    assert files == {"a.py", "pkg/b.py", "pkg/long.py"}  # no site-packages, no non-UTF-8, no empty file
    manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
    assert manifest["skipped_not_utf8"] == ["bad.py"] and manifest["train_files"] == 2
    held_out = manifest["heldout_files"]
    assert len(held_out) == 1 and manifest["holdout_fraction"] == fraction
    # the validation/ folder is the corpus's own split: exactly the held-out file's pieces
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"))
    val = token_cache.split_tokens(cfg, "validation")
    train = token_cache.split_tokens(cfg, "train")
    held_text = (root / held_out[0]).read_text()
    assert {d["path"].split("#")[0] for d in pieces} == set(held_out) and "".join(
        d["text"] for d in sorted(pieces, key=lambda d: int(d["path"].split("#")[1]))) == held_text
    assert len(val) == len(held_text.encode()) + len(pieces)  # each piece + EOS
    assert len(train) + len(val) == sum(len(d["text"].encode()) + 1 for d in docs)
    assert len(pieces) > 1
    assert build_stdlib_corpus(tmp_path / "corpus", root=root, holdout_files=0.34,
                                     eval_chunk_chars=500) == (path, fraction)  # built once
