"""Configs compose scale + variant + overrides; bad input fails at start-up naming the field and the fix."""
import json
import shutil
from pathlib import Path

import pytest

import train as train_cli
from vffn_jax import config as config_lib
from vffn_jax.config import ConfigError, load_config, tau_at, validate
from vffn_jax.testing.cli import call
from vffn_jax.testing.shapes import TINY_TRAIN


def test_scale_and_variant_compose():
    cfg = load_config("354m", "kloop", {"model.n_loops": "2", "train.lr": "1e-3"})
    assert (cfg.model.d_model, cfg.model.ffn, cfg.model.n_loops, cfg.train.lr) == (1024, "kloop", 2, 1e-3)
    assert cfg.scale == "354m" and cfg.variant == "kloop"
    assert load_config("tiny").model.ffn == "versatile"


@pytest.mark.parametrize("overrides,fragment", [
    ({"model.d_ff": 500}, "model.n_experts"),  # f % E != 0
    ({"model.top_k": 9}, "model.top_k"),  # top_k > E
    ({"model.max_depth": 0}, "model.max_depth"),
    ({"model.n_heads": 3}, "model.n_heads"),
    ({"model.ffn": "nope"}, "model.ffn"),
    ({"model.d_modle": 3}, "unknown config key 'model.d_modle'"),
    ({"train.lr": "fast"}, "train.lr"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one of"),
])
def test_invalid_configs_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config("tiny", "versatile", overrides)


def test_batch_must_divide_data_axes():
    cfg = load_config("tiny", "versatile", {"train.batch_size": 6, "mesh.data": 4})
    with pytest.raises(ConfigError, match=r"train\.batch_size=6 .*multiple of 4"):
        validate(cfg, n_devices=4)
    with pytest.raises(ConfigError, match="devices"):
        validate(load_config("tiny", "versatile", {"mesh.data": 3}), n_devices=8)


def test_experts_must_align_with_tensor_shards():
    cfg = load_config("tiny", "versatile", {"model.n_experts": 4, "model.d_ff": 516, "mesh.tensor": 3,
                                            "model.n_heads": 4, "mesh.data": 1})
    with pytest.raises(ConfigError):
        validate(cfg, n_devices=3)


def test_tau_schedule_is_pure_function_of_step():
    # the paper's explicit per-step factor (train.tau_decay > 0 takes precedence over train.tau_decay_frac)
    train = load_config("354m", overrides={"train.tau_decay": 0.99984}).train
    assert float(tau_at(0, train)) == pytest.approx(5.0)
    assert float(tau_at(1000, train)) == pytest.approx(5.0 * 0.99984 ** 1000, rel=1e-5)
    assert float(tau_at(30000, train)) == pytest.approx(0.1)
    # the default derives the factor from the run length: the floor at 96% of the 354m preset's 25,431 steps,
    # within 0.2% of the paper's per-step factor (0.99984 reaches it at step 24,448, 96.1%)
    train = load_config("354m").train
    assert float(tau_at(1000, train)) == pytest.approx(5.0 * 0.99984 ** 1000, rel=3e-4)
    assert float(tau_at(24413, train)) > 0.1 and float(tau_at(24414, train)) == pytest.approx(0.1)


def test_cli_errors_are_clear_and_help_explains_flags(tmp_path):
    bad = call(train_cli.main, "--config", "tiny", "--set", "model.top_k=12", "--dry-run")
    assert bad.returncode == 2 and "model.top_k=12" in bad.stderr and "Traceback" not in bad.stderr
    unknown = call(train_cli.main, "--config", "nosuch", "--dry-run")
    assert unknown.returncode == 2 and "354m" in unknown.stderr
    missing = call(train_cli.main, "--workdir", tmp_path / "x", "--set", "data.path=/no/such/corpus.txt", "--steps", 1)
    assert missing.returncode == 2 and "/no/such/corpus.txt" in missing.stderr
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("too short for one sequence")
    # a private corpus: its (tiny) token cache stays in tmp_path instead of the session's shared data cache
    short = call(train_cli.main, "--workdir", tmp_path / "run", "--set", f"data.path={corpus}",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--steps", 1)
    assert short.returncode == 2 and "holds one sequence of seq_len + 1" in short.stderr and "Traceback" not in short.stderr
    negative = call(train_cli.main, "--config", "tiny", "--set", "run.tasks_every=-5", "--dry-run")
    assert negative.returncode == 2 and "run.tasks_every=-5" in negative.stderr and "Traceback" not in negative.stderr
    latin1 = tmp_path / "latin1"
    latin1.mkdir()
    (latin1 / "a.txt").write_bytes("caf\u00e9 au lait, na".encode() + "\u00efve".encode("latin-1"))
    bad_text = call(train_cli.main, "--workdir", tmp_path / "run2", "--set", f"data.path={latin1}",
                    "--set", f"data.cache_dir={tmp_path / 'cache'}", "--steps", 1)
    assert bad_text.returncode == 2 and f"{latin1 / 'a.txt'}: not valid UTF-8 at byte 17" in bad_text.stderr
    assert "Traceback" not in bad_text.stderr and not (tmp_path / "run2" / "checkpoints").exists()
    helptext = call(train_cli.main, "--help")
    assert helptext.returncode == 0
    for flag in ("--config", "--variant", "--workdir", "--steps", "--set", "--dry-run", "--json"):
        assert flag in helptext.stdout


def test_cudnn_attention_without_a_gpu_is_refused_at_start_up(tmp_path):
    """model.attention=cudnn (bfloat16, which the section itself accepts) on CPU devices: exit 2 naming the field
    and the fix, from a dry run and from training before the workdir is written, not a JAX error at the first step."""
    import jax

    if jax.devices()[0].platform in ("gpu", "cuda"):
        pytest.skip("needs a host without a GPU")
    cudnn = ("--config", "tiny", "--set", "model.attention=cudnn", "--set", "model.dtype=bfloat16")
    for res in (call(train_cli.main, *cudnn, "--dry-run"),
                call(train_cli.main, *cudnn, "--workdir", tmp_path / "run", "--steps", 1, "--no-progress")):
        assert res.returncode == 2, res.stderr
        assert "error: model.attention=cudnn runs on NVIDIA GPUs only" in res.stderr and "devices here are cpu" in res.stderr
        assert "use model.attention=auto" in res.stderr and "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_json_reports_counts_and_shardings():
    res = call(train_cli.main, "--config", "354m", "--variant", "dense", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    assert info["params_total"] == 354_712_576
    assert info["params_non_embedding"] == 354_712_576 - 2 * 50304 * 1024
    assert info["shardings"]["layers/ffn/w_gate"]["spec"] == "P(None, 'fsdp', 'tensor')"
    assert info["flops_per_token_train"] > 6 * info["params_non_embedding"]


@pytest.mark.parametrize("variant", ["moe", "versatile_avg"])
def test_new_variants_follow_the_expert_rules(variant):
    assert load_config("tiny", variant).model.ffn == variant
    with pytest.raises(ConfigError, match=r"model\.n_experts"):
        load_config("tiny", variant, {"model.d_ff": 500})  # f % E != 0
    with pytest.raises(ConfigError, match=r"model\.top_k"):
        load_config("tiny", variant, {"model.top_k": 9})
    with pytest.raises(ConfigError, match=r"train\.init_step"):
        load_config("tiny", variant, {"train.init_step": 3})  # a step without a source
    if variant == "moe":  # each expert's f/E hidden units are sharded over tensor: 512/8 = 64 units
        validate(load_config("tiny", "moe", {"mesh.data": 2, "mesh.tensor": 4}), n_devices=8)
        with pytest.raises(ConfigError, match=r"mesh\.tensor=4 must divide each moe expert"):
            validate(load_config("tiny", "moe", {"model.d_ff": 48, "model.n_experts": 8, "mesh.data": 2,
                                                 "mesh.tensor": 4, "model.vocab_size": 512}), n_devices=8)


# --------------------------------------------------------------------------- the run-length Gumbel schedule
# (moved from tests/unit/study/test_fair_ablations.py)


def test_tau_decay_scales_with_run_length():
    import math

    from vffn_jax.config import TrainConfig, tau_decay_per_step

    for steps in (250, 25431, 190735):
        t = TrainConfig(steps=steps)  # tau_decay 0 (derive), tau_decay_frac 0.96
        floor = 0.96 * steps
        assert float(tau_at(math.floor(floor) - 1, t)) > t.tau_end
        assert float(tau_at(math.ceil(floor), t)) == pytest.approx(t.tau_end)
    cpu = load_config("study_cpu").train  # was 0.98 per step: the floor at 78% of its 250 steps
    assert math.log(cpu.tau_end / cpu.tau_start) / math.log(tau_decay_per_step(cpu)) == pytest.approx(0.96 * 250)
    explicit = TrainConfig(steps=250, tau_decay=0.98)  # an explicit per-step factor takes precedence
    assert tau_decay_per_step(explicit) == 0.98
    assert float(tau_at(100, explicit)) == pytest.approx(5.0 * 0.98 ** 100, rel=1e-5)
    frac1 = TrainConfig(steps=100, tau_decay_frac=1.0)
    assert float(tau_at(99, frac1)) > 0.1 and float(tau_at(100, frac1)) == pytest.approx(0.1)
    for bad in ({"train.tau_decay_frac": 0.0}, {"train.tau_decay_frac": 1.5}, {"train.tau_decay": 1.2},
                {"train.tau_decay": -0.1}):
        with pytest.raises(ConfigError, match="tau_decay"):
            load_config("tiny", "versatile", bad)
    assert tau_decay_per_step(load_config("tiny", "versatile", {"train.tau_decay": 0.99}).train) == 0.99


# --------------------------------------------------------------------------- config.json's format version

FORMAT_1 = Path(__file__).resolve().parents[1] / "fixtures" / "config_format1.json"  # written by vffn_jax before format versions


def test_saved_config_carries_its_format_version_and_older_or_newer_ones_are_handled():
    cfg = load_config("tiny", "versatile")
    saved = json.loads(cfg.to_json())
    assert saved["format_version"] == config_lib.FORMAT_VERSION
    assert config_lib.config_from_dict(saved) == cfg
    old = json.loads(FORMAT_1.read_text())
    assert "format_version" not in old
    assert config_lib.config_from_dict(old).model == load_config("tiny", "versatile", TINY_TRAIN).model
    with pytest.raises(ConfigError, match="written by a newer vffn_jax"):
        config_lib.config_from_dict({**saved, "format_version": config_lib.FORMAT_VERSION + 1}, "x/config.json")
    renamed = {"format_version": 1, "model": {"d_model": 64}}
    config_lib.MIGRATIONS[1] = lambda d: {**d, "model": {**d["model"], "d_model": 2 * d["model"]["d_model"]}}
    try:  # a migration step is applied to what an older format wrote, and only to that
        assert config_lib.config_from_dict(renamed).model.d_model == 128
        assert config_lib.config_from_dict({**renamed, "format_version": 2}).model.d_model == 64
    finally:
        config_lib.MIGRATIONS[1] = config_lib._v1_to_v2


def test_a_run_directory_of_config_format_1_trains_on_evaluates_and_generates(tmp_path):
    """A run directory whose config.json has no format_version (tests/fixtures/config_format1.json, as vffn_jax
    wrote it before) and checkpoints: re-running the same command resumes it, eval.py and generate.py read it."""
    import eval as eval_cli
    import generate as generate_cli

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FORMAT_1, run / "config.json")
    args = ["--config", FORMAT_1, "--workdir", run, "--no-progress"]
    assert call(train_cli.main, *args, "--stop-at", "2").returncode == 0
    shutil.copy(FORMAT_1, run / "config.json")  # the run as the older version left it: format 1 beside checkpoint 2
    res = call(train_cli.main, *args)
    assert res.returncode == 0 and "steps 2->4" in res.stdout, res.stderr
    assert json.loads((run / "config.json").read_text())["format_version"] == config_lib.FORMAT_VERSION
    shutil.copy(FORMAT_1, run / "config.json")
    res = call(eval_cli.main, "--workdir", run, "--json", "--no-plot")
    assert res.returncode == 0 and json.loads(res.stdout)["step"] == 4, res.stderr
    res = call(generate_cli.main, "--workdir", run, "--prompt", "And", "--max-new-tokens", 3, "--temperature", 0, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["generations"][0]["n_tokens"] == 3, res.stderr
