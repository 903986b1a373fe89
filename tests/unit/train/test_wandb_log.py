"""Weights & Biases logging (run.wandb, offline) and the goodput / step-split / MFU fields, through train.py's
`main` in-process: what the W&B run files hold is read back and compared with metrics.jsonl and config.json."""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest

import train as train_cli
from vffn_jax.testing.cli import call
from vffn_jax.testing.shapes import tiny_args
from vffn_jax.train.goodput import BUCKETS, STEP_PARTS

try:
    import wandb  # noqa: F401

    HAVE_WANDB = True
except ImportError:
    HAVE_WANDB = False
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed: pip install -r requirements-wandb.txt")


def run_train(workdir, *extra, **over):
    """train.py at the shared tiny shape (4 steps), with the progress line: plain lines on stderr (no TTY)."""
    return call(train_cli.main, *tiny_args(over), "--workdir", workdir, *extra)


# --------------------------------------------------------------------------- reading a .wandb file back


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", magic, version), then
    LevelDB-log framing (32 KiB blocks; chunks of crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)
    around serialized `wandb_internal_pb2.Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(run_dir: Path) -> dict:
    """run id, config and history ({step: {key: value}}, an image as {key: {field: value}}) of an offline run."""
    (log,) = run_dir.glob("run-*.wandb")
    out = {"dir": run_dir, "config": {}, "history": {}}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"], out["project"] = record.run.run_id, record.run.project
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = out["history"].setdefault(record.history.step.num, {})
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                if len(keys) == 1:
                    row[keys[0]] = json.loads(item.value_json)
                else:
                    row.setdefault(keys[0], {})[keys[1]] = json.loads(item.value_json)
    return out


# --------------------------------------------------------------------------- the runs, shared


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny run stopped at step 2 (with run.wandb, offline, when wandb is installed), then the same command
    resumed to its end (step 4, with the final eval) with the peak FLOP/s measured (run.peak_flops=-1)."""
    tmp = tmp_path_factory.mktemp("wandb_goodput")
    workdir = tmp / "run"
    extra = {"run.wandb": "vffn-test"} if HAVE_WANDB else {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(tmp / "wandb_dir"))
        first = run_train(workdir, "--stop-at", 2, **extra)
        assert first.returncode == 0, first.stderr[-3000:]
        first_rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        first_config = json.loads((workdir / "config.json").read_text())
        second = run_train(workdir, **extra, **{"run.peak_flops": -1})  # measure the peak
        assert second.returncode == 0, second.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"tmp": tmp, "workdir": workdir, "first": first, "first_rows": first_rows, "first_config": first_config,
            "second": second, "second_rows": rows[len(first_rows):],
            "wandb_runs": sorted((tmp / "wandb_dir" / "wandb").glob("offline-run-*"))}


def test_perf_fields_in_metrics_and_the_progress_line(runs):
    rows = [r for r in runs["first_rows"] if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    wall = 0.0
    for r in rows:
        parts = sum(r[f"perf/{p}"] for p in STEP_PARTS)
        assert all(r[f"perf/{p}"] >= 0 for p in STEP_PARTS) and r["perf/step_time"] == pytest.approx(parts)
        assert 0 < r["perf/goodput"] <= 1
        assert r["perf/goodput"] + sum(r[f"perf/badput/{b}"] for b in BUCKETS if b not in STEP_PARTS) \
            == pytest.approx(1.0)
        assert r["perf/badput/compile"] > 0 and r["perf/badput/startup"] > 0  # the run's first step is 'compile'
        assert r["perf/wall"] > wall  # seconds since the process started, growing
        wall = r["perf/wall"]
    assert rows[-1]["perf/step_time"] < 5.0 and rows[-1]["tokens_per_sec"] > 0
    from vffn_jax.perf.flops import peak_flops_per_device

    assert (rows[0]["mfu"] is None) == (peak_flops_per_device() is None)  # CPU: not in the table, run.peak_flops=0
    # the progress line (no TTY: plain lines on stderr) says it briefly
    assert "goodput=" in runs["first"].stderr and "%" in runs["first"].stderr.split("goodput=")[1][:5]
    after = [r for r in runs["second_rows"] if "loss" in r]
    assert [r["step"] for r in after] == [3, 4] and all(0 < r["perf/goodput"] <= 1 for r in after)
    assert after[0]["perf/badput/restore"] > 0 and "steps 2->4" in runs["second"].stdout
    assert all(0 < r["mfu"] < 1 for r in after)  # against this host's measured matmul FLOP/s


def test_bad_peak_flops_exits_2(tmp_path):
    bad = run_train(tmp_path / "run", "--dry-run", **{"run.peak_flops": -3})
    assert bad.returncode == 2 and "run.peak_flops=-3" in bad.stderr and "Traceback" not in bad.stderr


@needs_wandb
def test_wandb_offline_run_holds_config_metrics_and_depth_plot(runs):
    """Each invocation's W&B run holds the config and every row that invocation wrote to metrics.jsonl."""
    assert len(runs["wandb_runs"]) == 2, runs["wandb_runs"]
    run, resumed = (read_offline_run(d) for d in runs["wandb_runs"])
    run_id = (runs["workdir"] / "wandb_run_id").read_text().strip()
    assert run["id"] == run_id and run["project"] == "vffn-test"
    assert f"W&B run {run_id}" in runs["first"].stdout
    saved = runs["first_config"]  # the resolved config.json of that run
    for section in ("model", "train", "data", "mesh", "run"):
        assert run["config"][section] == saved[section], section
    assert run["config"]["run"]["wandb"] == "vffn-test" and run["config"]["info"]["params_total"] > 0
    # every row of metrics.jsonl, at its step: training windows, perf/ and the final eval
    for rows, logged_run in ((runs["first_rows"], run), (runs["second_rows"], resumed)):
        for row in rows:
            logged = logged_run["history"][row["step"]]
            for key, value in row.items():
                if isinstance(value, float):
                    assert logged[key] == value, key
                elif isinstance(value, list) and all(isinstance(v, float) for v in value):
                    assert [logged[f"{key}/{i}"] for i in range(len(value))] == value, key
    assert {1, 2} <= set(run["history"]) and "perf/goodput" in run["history"][2]
    final = runs["second_rows"][-1]
    assert "eval/loss" in final and resumed["history"][4]["eval/loss"] == final["eval/loss"]
    # the depth plot of the final eval, as an image file W&B keeps with the run
    image = resumed["history"][4]["eval/depth_per_layer"]
    png = resumed["dir"] / "files" / image["path"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and hashlib.sha256(data).hexdigest() == image["sha256"]
    assert struct.unpack(">II", data[16:24]) == (image["width"], image["height"])
    from vffn_jax.evals.summary import plot_depth

    redrawn = plot_depth({"scale": "tiny", "variant": "versatile", "step": 4, "depth_hist": final["eval/depth_hist"],
                          "mean_depth": final["eval/mean_depth"], "mean_alpha": final["eval/mean_alpha"]},
                         runs["tmp"] / "redrawn.png")
    assert redrawn.read_bytes() == data  # eval.py's plot of that eval row


@needs_wandb
def test_a_rerun_resumes_the_same_wandb_run(runs):
    first, second = (read_offline_run(d) for d in runs["wandb_runs"])
    assert second["id"] == first["id"] == (runs["workdir"] / "wandb_run_id").read_text().strip()
    assert sorted(second["history"]) == [3, 4]
    # the re-run's own config (its run.peak_flops) is the resumed W&B run's
    assert first["config"]["run"]["peak_flops"] == 0 and second["config"]["run"]["peak_flops"] == -1
    rows = [json.loads(line) for line in (runs["workdir"] / "metrics.jsonl").read_text().splitlines()]
    assert second["history"][4]["loss"] == next(r["loss"] for r in rows if r["step"] == 4 and "loss" in r)


def test_wandb_missing_or_misspelled_exits_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as it does without the package
    res = call(train_cli.main, *tiny_args({"run.wandb": "vffn-test"}), "--workdir", tmp_path / "run")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "run.wandb='vffn-test'" in res.stderr and "pip install -r requirements-wandb.txt" in res.stderr
    assert "Traceback" not in res.stderr
    bad = run_train(tmp_path / "run2", "--dry-run", **{"run.wandb": "a/b/c"})
    assert bad.returncode == 2 and "run.wandb='a/b/c'" in bad.stderr and "PROJECT/ENTITY" in bad.stderr
