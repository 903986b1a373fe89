"""End-to-end training: resume exactness, sharded == single device, NaN stop, kill during save, outputs."""
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.model import placement
from vffn_jax.train import optimizer
from vffn_jax.train import loop as trainer
from vffn_jax.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[3]
SMALL = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 2, "model.d_ff": 128,
         "train.batch_size": 8, "train.seq_len": 32, "train.steps": 6, "run.log_every": 1,
         "run.ckpt_every": 3, "run.eval_every": 0, "run.eval_batches": 2}


def small_cfg(tmp_path, variant="versatile", **over):
    return load_config("tiny", variant, {**SMALL, "data.cache_dir": str(tmp_path / "cache"), **over})


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resumed_run_equals_uninterrupted(tmp_path):
    cfg = small_cfg(tmp_path)
    full = trainer.train(cfg, tmp_path / "full", progress=False)
    trainer.train(cfg, tmp_path / "split", progress=False, stop_at=3)
    assert ckpt.latest_step(tmp_path / "split") == 3
    resumed = trainer.train(cfg, tmp_path / "split", progress=False)  # same call again resumes
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in a] == [b[s] for s in a], "resume must reproduce the uninterrupted losses exactly"
    assert resumed["eval"]["loss"] == full["eval"]["loss"]


def test_eight_devices_match_one_device(tmp_path):
    one = small_cfg(tmp_path, **{"mesh.data": 1})
    eight = small_cfg(tmp_path, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    trainer.train(one, tmp_path / "one", devices=jax.devices()[:1], progress=False)
    trainer.train(eight, tmp_path / "eight", progress=False)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], rtol=2e-4)
    assert a[6] < a[1]


def test_outputs_config_metrics_tensorboard(tmp_path):
    cfg = small_cfg(tmp_path, **{"train.steps": 3})
    trainer.train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["d_model"] == 64 and saved["variant"] == "versatile"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "tokens_per_sec", "tau", "lr", "mean_depth", "mean_alpha", "expert_load",
            "balance_loss", "router_entropy", "grad_norm"} <= set(rows[0])
    assert "eval/loss" in rows[-1] and "eval/depth_hist" in rows[-1]
    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert events
    tags = read_event_tags(events[0])
    assert {"loss", "tokens_per_sec", "eval/loss"} <= tags


def read_event_tags(path):
    """Minimal TFRecord reader: TensorBoard event files are length-prefixed Event protos."""
    from tensorboardX.proto import event_pb2

    tags, data = set(), Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        tags.update(v.tag for v in event.summary.value)
        pos += 12 + length + 4
    return tags


def test_resume_with_different_model_is_refused(tmp_path):
    trainer.train(small_cfg(tmp_path, **{"train.steps": 1}), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="d_model"):
        trainer.train(small_cfg(tmp_path, **{"model.d_model": 32}), tmp_path / "run", progress=False)


# train.py processes share the tests' persistent compilation cache: the same small programs compile once
CLI_ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def run_cli(args, **kw):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=CLI_ENV,
                          **kw)


def cli_args(tmp_path, workdir, **over):
    args = ["--config", "tiny", "--workdir", str(workdir), "--no-progress"]
    for k, v in {**SMALL, "data.cache_dir": str(tmp_path / "cache"), **over}.items():
        args += ["--set", f"{k}={v}"]
    return args


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "nan"
    over = {"train.steps": 20, "run.ckpt_every": 1, "train.lr": 1e30, "train.warmup_frac": 0}
    proc = run_cli(cli_args(tmp_path, workdir, **over), timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "training stopped" in proc.stderr and "last good checkpoint" in proc.stderr
    last = ckpt.latest_step(workdir)
    assert last is not None and last < 20
    cfg = small_cfg(tmp_path)
    s = placement.setup(cfg)
    params, _ = ckpt.restore(ckpt.make_manager(workdir, read_only=True), last,
                             ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_kill_during_async_save_keeps_earlier_checkpoints(tmp_path):
    workdir = tmp_path / "killed"
    over = {"train.steps": 400, "run.ckpt_every": 1, "run.keep_ckpts": 50}
    args = cli_args(tmp_path, workdir, **over)
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=CLI_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckdir = workdir / "checkpoints"
    deadline = time.time() + 240
    try:
        # kill the moment a save is in flight after at least two finished ones
        while time.time() < deadline:
            finished = [p for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.exists() else []
            in_flight = list(ckdir.glob("*tmp*")) if ckdir.exists() else []
            if len(finished) >= 2 and in_flight:
                break
            time.sleep(0.005)
        else:
            pytest.fail("no checkpoint save observed in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    steps = ckpt.all_steps(workdir)
    assert len(steps) >= 2
    cfg = small_cfg(tmp_path)
    s = placement.setup(cfg)
    for step in steps:  # every checkpoint that counts as a step restores
        ckpt.restore(ckpt.make_manager(workdir, read_only=True), step,
                     ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings))
    # re-running the same command resumes from the last complete step (capped here to keep the test short)
    resume = run_cli(args + ["--set", f"train.steps={steps[-1] + 2}"], timeout=300)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert f"steps {steps[-1]}->{steps[-1] + 2}" in resume.stdout


def test_weight_decay_skips_norm_scales_only():
    _, abstract = placement.abstract_model(load_config("tiny").model)
    mask = jax.tree_util.tree_flatten_with_path(optimizer._decay_mask(abstract))[0]
    no_decay = {placement.param_name(path) for path, decay in mask if not decay}
    assert no_decay == {"final_norm", "layers/attn_norm", "layers/ffn/norm_scale"}
    assert len(mask) > len(no_decay) + 5


def _wait_for_step(workdir, step, proc, deadline_s=240):
    """Blocks until metrics.jsonl has logged `step` (or the process ended / the deadline passed)."""
    deadline = time.time() + deadline_s
    path = Path(workdir) / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and any(json.loads(line).get("step", 0) >= step and "loss" in line
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.02)
    pytest.fail(f"step {step} was never logged in {workdir} (rc={proc.poll()})")


def test_sigterm_saves_the_step_reached_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    over = {"train.steps": 60, "run.ckpt_every": 1000}  # periodic saves far away: only the preemption saves
    args = cli_args(tmp_path, tmp_path / "preempted", **over)
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=CLI_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_step(tmp_path / "preempted", 3, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err[-3000:]
    (saved,) = ckpt.all_steps(tmp_path / "preempted")
    assert 3 <= saved < 60
    assert f"preempted: stopped at step {saved} after saving it" in err and "re-run the same command" in err
    assert max(losses(tmp_path / "preempted")) == saved  # metrics up to the saved step were flushed

    again = run_cli(args, timeout=300)  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"steps {saved}->60" in again.stdout
    full = run_cli(cli_args(tmp_path, tmp_path / "full", **over), timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    a, b = losses(tmp_path / "full"), losses(tmp_path / "preempted")
    assert sorted(a) == sorted(b) == list(range(1, 61))
    assert [a[s] for s in a] == [b[s] for s in a], "preempted + resumed must reproduce the uninterrupted losses"


def test_time_based_saves_back_up_step_based_ones(tmp_path):
    # ckpt_every far away; a save is due whenever 0.6 ms passed since the last one, checked at log steps
    cfg = small_cfg(tmp_path, **{"train.steps": 6, "run.ckpt_every": 1000, "run.ckpt_minutes": 1e-5,
                                 "run.log_every": 2, "run.keep_ckpts": 10})
    trainer.train(cfg, tmp_path / "timed", progress=False)
    assert ckpt.all_steps(tmp_path / "timed") == [2, 4, 6]
    trainer.train(small_cfg(tmp_path, **{"train.steps": 6, "run.ckpt_every": 1000}), tmp_path / "untimed",
                  progress=False)
    assert ckpt.all_steps(tmp_path / "untimed") == [6]


def test_resume_skips_a_damaged_step_and_retrains_it(tmp_path, capsys):
    """64 KiB of random bytes in the middle of the newest step's largest params file: the re-run says so,
    resumes from the step before, and reproduces the uninterrupted losses."""
    from vffn_jax.checkpoint import integrity as ckpt_integrity

    cfg = small_cfg(tmp_path)
    trainer.train(cfg, tmp_path / "full", progress=False)
    reference = losses(tmp_path / "full")
    step_dir = ckpt.checkpoint_dir(tmp_path / "full") / "6"
    sizes = ckpt_integrity.list_files(step_dir)
    largest = step_dir / max((k for k in sizes if k.startswith("params/")), key=sizes.get)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + (64 << 10)] = np.random.default_rng(0).bytes(len(data[middle:middle + (64 << 10)]))
    largest.write_bytes(bytes(data))
    capsys.readouterr()

    trainer.train(cfg, tmp_path / "full", progress=False)  # the same call again
    out = capsys.readouterr().out
    assert "checkpoint step 6 is damaged (params: file" in out and "resuming from step 3 instead" in out
    assert "steps 3->6" in out
    assert losses(tmp_path / "full") == reference
    assert ckpt.all_steps(tmp_path / "full") == [3, 6]


def test_profile_steps_write_a_trace_for_tensorboard(tmp_path):
    cfg = small_cfg(tmp_path, **{"train.steps": 4, "run.profile_steps": "2:3"})
    trainer.train(cfg, tmp_path / "prof", progress=False)
    traces = list((tmp_path / "prof" / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list(traces[0].parent.glob("*.trace.json.gz"))  # Perfetto
    with pytest.raises(ConfigError, match="run.profile_steps='3:2'"):
        small_cfg(tmp_path, **{"run.profile_steps": "3:2"})
