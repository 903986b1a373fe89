"""End-to-end training at the shared tiny shape: resume exactness, sharded == single device, outputs, NaN stop,
time-based saves, a damaged checkpoint skipped, profiling. Real processes (a kill during an async save,
SIGTERM): tests/integration/train/test_loop.py."""
import json
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

import train as train_cli
from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.config import ConfigError, load_config
from vffn_jax.model import placement
from vffn_jax.testing.cli import call
from vffn_jax.testing.shapes import tiny_args, tiny_config
from vffn_jax.train import loop as trainer
from vffn_jax.train import optimizer


def losses(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_eval_loss(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["eval/loss"] for r in rows if "eval/loss" in r][-1]


def restore_params(workdir, step):
    """The params of checkpoint `step` of a run at the shared tiny shape."""
    s = placement.setup(tiny_config())
    return ckpt.restore(ckpt.make_manager(workdir, read_only=True), step,
                        ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings))[0]


def test_resumed_run_equals_uninterrupted(tiny_run, tmp_path):
    """Stopped at step 2 and run again: the losses and final eval of the session's uninterrupted `tiny_run`."""
    cfg = tiny_config()  # tiny_run's config
    trainer.train(cfg, tmp_path / "split", progress=False, stop_at=2)
    assert ckpt.latest_step(tmp_path / "split") == 2
    resumed = trainer.train(cfg, tmp_path / "split", progress=False)  # same call again resumes
    a, b = losses(tiny_run), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 5))
    assert [a[s] for s in a] == [b[s] for s in a], "resume must reproduce the uninterrupted losses exactly"
    assert resumed["eval"]["loss"] == final_eval_loss(tiny_run)


# Its one-device and (2, 2, 2) train steps are the ones tests/unit/train/test_step.py compares microbatching with
def test_eight_devices_match_one_device(tiny_run, tmp_path):
    """One device, (data 2, fsdp 2, tensor 2), and tiny_run's 8-way data parallelism train alike."""
    one = tiny_config(overrides={"mesh.data": 1})
    eight = tiny_config(overrides={"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    trainer.train(one, tmp_path / "one", devices=jax.devices()[:1], progress=False)
    trainer.train(eight, tmp_path / "eight", progress=False)
    a, b, c = losses(tmp_path / "one"), losses(tmp_path / "eight"), losses(tiny_run)
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(a)], rtol=2e-4)
    np.testing.assert_allclose([a[s] for s in sorted(a)], [c[s] for s in sorted(a)], rtol=2e-4)
    assert a[4] < a[1]


def test_outputs_config_metrics_tensorboard(tiny_run):
    saved = json.loads((tiny_run / "config.json").read_text())
    assert saved["model"]["d_model"] == 64 and saved["variant"] == "versatile"
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "tokens_per_sec", "tau", "lr", "mean_depth", "mean_alpha", "expert_load",
            "balance_loss", "router_entropy", "grad_norm"} <= set(rows[0])
    assert "eval/loss" in rows[-1] and "eval/depth_hist" in rows[-1]
    events = list((tiny_run / "tb").glob("events.out.tfevents.*"))
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


def test_resume_with_different_model_is_refused(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "run")
    with pytest.raises(ConfigError, match="d_model"):
        trainer.train(tiny_config(overrides={"model.d_model": 32}), tmp_path / "run", progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    """train.py exits 3 naming the last good checkpoint, which restores with finite params."""
    workdir = tmp_path / "nan"
    over = {"train.steps": 20, "run.ckpt_every": 1, "train.lr": 1e30, "train.warmup_frac": 0}
    res = call(train_cli.main, *tiny_args(over), "--workdir", workdir, "--no-progress")
    assert res.returncode == 3, res.stderr[-2000:]
    assert "training stopped" in res.stderr and "last good checkpoint" in res.stderr
    last = ckpt.latest_step(workdir)
    assert last is not None and last < 20
    params = restore_params(workdir, last)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_weight_decay_skips_norm_scales_only():
    _, abstract = placement.abstract_model(load_config("tiny").model)
    mask = jax.tree_util.tree_flatten_with_path(optimizer._decay_mask(abstract))[0]
    no_decay = {placement.param_name(path) for path, decay in mask if not decay}
    assert no_decay == {"final_norm", "layers/attn_norm", "layers/ffn/norm_scale"}
    assert len(mask) > len(no_decay) + 5


def test_time_based_saves_back_up_step_based_ones(tmp_path):
    # ckpt_every far away; a save is due whenever 0.6 ms passed since the last one, checked at log steps
    cfg = tiny_config(overrides={"run.ckpt_every": 1000, "run.ckpt_minutes": 1e-5, "run.log_every": 2,
                                 "run.keep_ckpts": 10})
    trainer.train(cfg, tmp_path / "timed", progress=False)
    assert ckpt.all_steps(tmp_path / "timed") == [2, 4]
    trainer.train(tiny_config(overrides={"run.ckpt_every": 1000}), tmp_path / "untimed", progress=False)
    assert ckpt.all_steps(tmp_path / "untimed") == [4]


def test_resume_skips_a_damaged_step_and_retrains_it(tiny_run, tmp_path, capsys):
    """64 KiB of random bytes in the middle of the newest step's largest params file (of a copy of tiny_run):
    the re-run says so, resumes from the step before, and reproduces the uninterrupted losses."""
    from vffn_jax.checkpoint import integrity as ckpt_integrity

    workdir = tmp_path / "full"
    shutil.copytree(tiny_run, workdir)
    reference = losses(tiny_run)
    step_dir = ckpt.checkpoint_dir(workdir) / "4"
    sizes = ckpt_integrity.list_files(step_dir)
    largest = step_dir / max((k for k in sizes if k.startswith("params/")), key=sizes.get)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + (64 << 10)] = np.random.default_rng(0).bytes(len(data[middle:middle + (64 << 10)]))
    largest.write_bytes(bytes(data))
    capsys.readouterr()

    trainer.train(tiny_config(), workdir, progress=False)  # the same call again
    out = capsys.readouterr().out
    assert "checkpoint step 4 is damaged (params: file" in out and "resuming from step 2 instead" in out
    assert "steps 2->4" in out
    assert losses(workdir) == reference
    assert ckpt.all_steps(workdir) == [2, 4]


def test_profile_steps_write_a_trace_for_tensorboard(tmp_path):
    cfg = tiny_config(overrides={"run.profile_steps": "2:3"})
    trainer.train(cfg, tmp_path / "prof", progress=False)
    traces = list((tmp_path / "prof" / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list(traces[0].parent.glob("*.trace.json.gz"))  # Perfetto
    with pytest.raises(ConfigError, match="run.profile_steps='3:2'"):
        tiny_config(overrides={"run.profile_steps": "3:2"})
