"""Weights & Biases logging (run.wandb, offline) and the goodput / step-split / MFU fields, through the real
train.py: what the W&B run file holds is read back and compared with metrics.jsonl and config.json."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vffn_jax.train.goodput import BUCKETS, STEP_PARTS, Goodput

ROOT = Path(__file__).resolve().parents[3]
TINY = {"model.n_layers": 1, "model.d_model": 32, "model.n_heads": 2, "model.d_ff": 64, "train.batch_size": 8,
        "train.seq_len": 32, "train.steps": 6, "run.log_every": 2, "run.ckpt_every": 3, "run.eval_every": 0,
        "run.eval_batches": 1}
try:
    import wandb  # noqa: F401

    HAVE_WANDB = True
except ImportError:
    HAVE_WANDB = False
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed: pip install -r requirements-wandb.txt")


def run_train(tmp, workdir, *extra, **over):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp / "wandb_dir")}
    args = ["--config", "tiny", "--workdir", str(workdir), *extra]  # with the progress line: plain lines on stderr
    for k, v in {**TINY, "data.cache_dir": str(tmp / "cache"), **over}.items():
        args += ["--set", f"{k}={v}"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)
    return proc


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
    """A 6-step tiny run (with run.wandb when wandb is installed), then the same command to 8 steps, with the
    peak FLOP/s measured (run.peak_flops=-1)."""
    tmp = tmp_path_factory.mktemp("wandb_goodput")
    workdir = tmp / "run"
    extra = {"run.wandb": "vffn-test"} if HAVE_WANDB else {}
    first = run_train(tmp, workdir, **extra)
    assert first.returncode == 0, first.stderr[-3000:]
    first_rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    first_config = json.loads((workdir / "config.json").read_text())
    second = run_train(tmp, workdir, **extra, **{"train.steps": 8, "run.peak_flops": -1})  # measure the peak
    assert second.returncode == 0, second.stderr[-3000:]
    return {"tmp": tmp, "workdir": workdir, "first": first, "first_rows": first_rows, "first_config": first_config, "second": second,
            "wandb_runs": sorted((tmp / "wandb_dir" / "wandb").glob("offline-run-*"))}


def test_goodput_accountant_charges_every_second_to_one_bucket():
    t = [100.0]
    clock = Goodput(now=lambda: t[0], started=2.0)  # 2 s of imports before it existed: start-up
    t[0] += 1.0
    with clock("restore"):
        t[0] += 3.0
    clock.switch("compute")
    with clock("compile"):
        t[0] += 10.0
    for _ in range(4):  # four steps of 0.5 s data wait + 1 s compute + 0.5 s logging
        with clock("data_wait"):
            t[0] += 0.5
        t[0] += 1.0
        with clock("logging"):
            with clock("save"):  # nested: the save's second is not logging's
                t[0] += 1.0
            t[0] += 0.5
    totals = clock.snapshot()
    assert totals == {**dict.fromkeys(BUCKETS, 0.0), "startup": 3.0, "restore": 3.0, "compile": 10.0,
                      "data_wait": 2.0, "compute": 4.0, "logging": 2.0, "save": 4.0}
    row, snap = clock.report(None, steps=4)
    assert row["perf/step_time"] == pytest.approx(2.0)
    assert (row["perf/data_wait"], row["perf/compute"], row["perf/logging"]) == pytest.approx((0.5, 1.0, 0.5))
    assert row["perf/wall"] == pytest.approx(28.0) and row["perf/goodput"] == pytest.approx(8.0 / 28.0)
    assert row["perf/goodput"] + sum(v for k, v in row.items() if k.startswith("perf/badput/")) == pytest.approx(1.0)
    assert row["perf/badput/compile"] == pytest.approx(10.0 / 28.0)
    with clock("eval"):  # the next window: 2 steps after an eval of 6 s
        t[0] += 6.0
    with clock("data_wait"):
        t[0] += 1.0
    t[0] += 3.0
    row2, _ = clock.report(snap, steps=2)
    assert (row2["perf/data_wait"], row2["perf/compute"], row2["perf/step_time"]) == pytest.approx((0.5, 1.5, 2.0))
    assert row2["perf/goodput"] == pytest.approx(12.0 / 38.0) and row2["perf/badput/eval"] == pytest.approx(6 / 38)
    with pytest.raises(ValueError, match="unknown goodput bucket 'sleep'"):
        clock.switch("sleep")


def test_perf_fields_in_metrics_and_the_progress_line(runs):
    rows = [r for r in runs["first_rows"] if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    wall = 0.0
    for r in rows:
        parts = sum(r[f"perf/{p}"] for p in STEP_PARTS)
        assert all(r[f"perf/{p}"] >= 0 for p in STEP_PARTS) and r["perf/step_time"] == pytest.approx(parts)
        assert 0 < r["perf/goodput"] <= 1
        assert r["perf/goodput"] + sum(r[f"perf/badput/{b}"] for b in BUCKETS if b not in STEP_PARTS) \
            == pytest.approx(1.0)
        assert r["perf/badput/compile"] > 0 and r["perf/badput/startup"] > 0  # this process compiled its first step
        assert r["perf/wall"] > wall  # seconds since the process started, growing
        wall = r["perf/wall"]
    assert rows[-1]["perf/step_time"] < 5.0 and rows[-1]["tokens_per_sec"] > 0
    from vffn_jax.perf.flops import peak_flops_per_device

    assert (rows[0]["mfu"] is None) == (peak_flops_per_device() is None)  # CPU: not in the table, run.peak_flops=0
    # the progress line (no TTY: plain lines on stderr) says it briefly
    assert "goodput=" in runs["first"].stderr and "%" in runs["first"].stderr.split("goodput=")[1][:5]
    resumed = [json.loads(line) for line in (runs["workdir"] / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in resumed if r["step"] > 6 and "loss" in r]
    assert [r["step"] for r in after] == [8] and 0 < after[0]["perf/goodput"] <= 1
    assert after[0]["perf/badput/restore"] > 0 and "steps 6->8" in runs["second"].stdout
    assert 0 < after[0]["mfu"] < 1  # against this host's measured matmul FLOP/s


def test_bad_peak_flops_exits_2(tmp_path):
    bad = run_train(tmp_path, tmp_path / "run", "--dry-run", **{"run.peak_flops": -3})
    assert bad.returncode == 2 and "run.peak_flops=-3" in bad.stderr and "Traceback" not in bad.stderr


@needs_wandb
def test_wandb_offline_run_holds_config_metrics_and_depth_plot(runs):
    assert len(runs["wandb_runs"]) == 2, runs["wandb_runs"]
    run = read_offline_run(runs["wandb_runs"][0])
    run_id = (runs["workdir"] / "wandb_run_id").read_text().strip()
    assert run["id"] == run_id and run["project"] == "vffn-test"
    assert f"W&B run {run_id}" in runs["first"].stdout
    saved = runs["first_config"]  # the resolved config.json of that run
    for section in ("model", "train", "data", "mesh", "run"):
        assert run["config"][section] == saved[section], section
    assert run["config"]["run"]["wandb"] == "vffn-test" and run["config"]["info"]["params_total"] > 0
    # every row of metrics.jsonl, at its step: training windows, perf/ and the final eval
    for row in runs["first_rows"]:
        logged = run["history"][row["step"]]
        for key, value in row.items():
            if isinstance(value, float):
                assert logged[key] == value, key
            elif isinstance(value, list) and all(isinstance(v, float) for v in value):
                assert [logged[f"{key}/{i}"] for i in range(len(value))] == value, key
    assert {2, 4, 6} <= set(run["history"]) and "perf/goodput" in run["history"][4]
    assert run["history"][6]["eval/loss"] == runs["first_rows"][-1]["eval/loss"]
    # the depth plot of the final eval, as an image file W&B keeps with the run
    image = run["history"][6]["eval/depth_per_layer"]
    png = run["dir"] / "files" / image["path"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and hashlib.sha256(data).hexdigest() == image["sha256"]
    assert struct.unpack(">II", data[16:24]) == (image["width"], image["height"])
    from vffn_jax.evals.summary import plot_depth

    final = runs["first_rows"][-1]
    redrawn = plot_depth({"scale": "tiny", "variant": "versatile", "step": 6, "depth_hist": final["eval/depth_hist"],
                          "mean_depth": final["eval/mean_depth"], "mean_alpha": final["eval/mean_alpha"]},
                         runs["tmp"] / "redrawn.png")
    assert redrawn.read_bytes() == data  # eval.py's plot of that eval row


@needs_wandb
def test_a_rerun_resumes_the_same_wandb_run(runs):
    first, second = (read_offline_run(d) for d in runs["wandb_runs"])
    assert second["id"] == first["id"] == (runs["workdir"] / "wandb_run_id").read_text().strip()
    assert sorted(second["history"]) == [8] and second["config"]["train"]["steps"] == 8
    rows = [json.loads(line) for line in (runs["workdir"] / "metrics.jsonl").read_text().splitlines()]
    assert second["history"][8]["loss"] == next(r["loss"] for r in rows if r["step"] == 8 and "loss" in r)


def test_wandb_missing_or_misspelled_exits_2(tmp_path):
    # a process where `import wandb` fails as it does without the package
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nclass NoWandb:\n    def find_spec(self, name, path=None, target=None):\n"
                       "        if name == 'wandb' or name.startswith('wandb.'):\n"
                       "            raise ModuleNotFoundError(\"No module named 'wandb'\")\n"
                       "sys.meta_path.insert(0, NoWandb())\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "train.py", "--config", "tiny", "--workdir", str(tmp_path / "run"),
                           "--set", "run.wandb=vffn-test", "--set", f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "run.wandb='vffn-test'" in proc.stderr and "pip install -r requirements-wandb.txt" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = run_train(tmp_path, tmp_path / "run2", "--dry-run", **{"run.wandb": "a/b/c"})
    assert bad.returncode == 2 and "run.wandb='a/b/c'" in bad.stderr and "PROJECT/ENTITY" in bad.stderr
