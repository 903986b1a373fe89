"""vffn_jax/hf/importer.py: Hugging Face Llama checkpoints, written by transformers itself, imported as vffn_jax
runs whose logits equal transformers' own; --variant adds fresh routers; bad input exits 2 naming the field.

Two tiny random LlamaForCausalLM models (f32, random norms so every tensor matters): grouped-query attention
with tied embeddings (one safetensors file), and Llama 3 RoPE scaling untied (sharded: an index and several
files), each with a small byte-level BPE tokenizer trained here, saved through PreTrainedTokenizerFast."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vffn_jax.checkpoint.restore import restore_params  # noqa: E402
from vffn_jax.data.tokenizer import load_tokenizer  # noqa: E402
from vffn_jax.hf import importer  # noqa: E402
from vffn_jax.testing import cli  # noqa: E402
from vffn_jax.cli import hf as hf_cli  # noqa: E402
from vffn_jax.model import kv_cache  # noqa: E402
VOCAB = 304  # the tokenizer's 300 tokens plus padded embedding rows
EOS_TOKEN, BOS_TOKEN = "<|end_of_text|>", "<|begin_of_text|>"
GQA_TIED = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=64)
# a short original context, so that Llama 3's scaling touches every frequency band (kept, divided, smoothed)
LLAMA3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=8192,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["In the beginning was the word, and the word was with the model."] * 20, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)


def _save_llama(folder: Path, fields: dict, seed: int, tok, **save_kw):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      **fields)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # weights far from init so that a mix-up anywhere shows in the logits
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.2)
    model.save_pretrained(str(folder), **save_kw)
    tok.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_import")
    tok = _tokenizer()
    out = {"root": root, "tok": tok}
    out["gqa"] = (root / "gqa_tied", _save_llama(root / "gqa_tied", GQA_TIED, 0, tok))
    out["llama3"] = (root / "llama3", _save_llama(root / "llama3", LLAMA3, 1, tok, max_shard_size="40KB"))
    return out


@pytest.fixture(scope="module")
def runs(hf) -> dict:
    root = hf["root"]
    return {"gqa": importer.import_hf(hf["gqa"][0], root / "run_gqa"),
            "llama3": importer.import_hf(hf["llama3"][0], root / "run_llama3")}


def _logits_match(folder: Path, model, tokens_bt: np.ndarray):
    run = restore_params(folder)
    logits, *_ = kv_cache.prefill(run.cfg.model, kv_cache.pure_params(run.params), jnp.asarray(tokens_bt),
                                jnp.full((tokens_bt.shape[0],), tokens_bt.shape[1]), tokens_bt.shape[1],
                                all_logits=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens_bt).long()).logits.numpy()
    assert np.abs(ref).max() > 1.0, "the logits should not be near zero (an empty test)"
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)
    return run


@pytest.mark.parametrize("name", ["gqa", "llama3"])
def test_logits_equal_transformers(hf, runs, name):
    folder, model = hf[name]
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 40)).astype(np.int32)
    run = _logits_match(Path(runs[name]["out"]), model, tokens)
    m = run.cfg.model
    if name == "gqa":
        assert (m.n_heads, m.kv_heads, m.tie_embeddings, m.rope_scaling) == (4, 2, True, "none")
        assert "lm_head" not in kv_cache.pure_params(run.params)
        assert run.cfg.train.seq_len == 64
    else:
        assert (m.kv_heads, m.tie_embeddings, m.rope_scaling, m.rope_original_max_len) == (4, False, "llama3", 16)
        assert run.cfg.train.seq_len == 4096  # min(max_position_embeddings, 4096)
        assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / importer.INDEX).is_file()
    assert m.ffn == "dense" and m.param_dtype == "float32" and run.step == 0
    # the tokenizer travels: data.tokenizer is the copy inside the run, its EOS is model.eos_id
    assert run.cfg.data.tokenizer == str(Path(runs[name]["out"]) / "tokenizer" / "tokenizer.json")
    tok = load_tokenizer(run.cfg.data.tokenizer)
    assert tok.eos_id == m.eos_id == hf["tok"].eos_token_id
    assert tok.encode("the word") == hf["tok"].encode("the word", add_special_tokens=False)
    assert (Path(runs[name]["out"]) / "tokenizer" / "tokenizer_config.json").is_file()


def test_variant_import_equals_continued_pretraining_from_the_dense_import(hf, runs, capsys):
    """--variant versatile: every Llama weight equals the dense import's, and the whole state equals what
    `train.py --init-from <dense import>` starts a versatile run with (routers: its own init with train.seed)."""
    from vffn_jax.model import placement
    from vffn_jax.train import init_from, optimizer

    out = hf["root"] / "run_versatile"
    rc = hf_cli.import_main(["--hf", str(hf["llama3"][0]), "--out", str(out), "--variant", "versatile",
                        "--set", "train.seed=3", "--set", "model.n_experts=4"])
    assert rc == 0, capsys.readouterr().err
    assert "fresh: layers/ffn/depth_router, layers/ffn/expert_router" in capsys.readouterr().out
    run = restore_params(out)
    assert run.cfg.model.ffn == "versatile" and run.cfg.train.seed == 3 and run.cfg.variant == "versatile"

    def flat(params):
        return {placement.param_name(p): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(kv_cache.pure_params(params))[0]}

    ours, dense = flat(run.params), flat(restore_params(runs["llama3"]["out"]).params)
    assert set(ours) - set(dense) == {"layers/ffn/expert_router", "layers/ffn/depth_router"}
    for name, x in dense.items():
        np.testing.assert_array_equal(ours[name], x, err_msg=name)
    assert ours["layers/ffn/expert_router"].shape == (2, 64, 4) and ours["layers/ffn/depth_router"].std() > 0.01

    s = placement.setup(run.cfg)
    tx = optimizer.make_optimizer(run.cfg.train)
    _, opt_shardings = optimizer.opt_state_shardings(tx, s)
    continued, _, info = init_from.init_from_checkpoint(s, tx, opt_shardings, runs["llama3"]["out"])
    assert sorted(info["init_fresh"]) == ["layers/ffn/depth_router", "layers/ffn/expert_router"]
    for name, x in flat(continued).items():
        np.testing.assert_array_equal(ours[name], x, err_msg=name)
    record = json.loads((out / importer.IMPORT_RECORD).read_text())
    assert record["fresh"] == ["layers/ffn/depth_router", "layers/ffn/expert_router"]


def test_bfloat16_checkpoint_imports_bit_exact(hf):
    """A bf16 checkpoint (what most published ones are): param_dtype bfloat16 and every tensor bit-exact."""
    import copy

    from safetensors import safe_open

    from vffn_jax.hf.weights import hf_tensors

    folder, out = hf["root"] / "bf16", hf["root"] / "run_bf16"
    copy.deepcopy(hf["gqa"][1]).to(torch.bfloat16).save_pretrained(str(folder))
    hf["tok"].save_pretrained(str(folder))
    info = importer.import_hf(folder, out)
    run = restore_params(out)
    assert info["source_dtype"] == run.cfg.model.param_dtype == "bfloat16"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for name, ours in hf_tensors(run.cfg.model, run.params):
            names.discard(name)
            ref = f.get_tensor(name)
            assert ref.dtype == torch.bfloat16 and ours.dtype.name == "bfloat16", name
            np.testing.assert_array_equal(ours.view(np.uint16), ref.view(torch.int16).numpy().view(np.uint16), name)
    assert not names


def test_import_export_import_is_exact(hf, runs):
    """A dense import exported back to Hugging Face (vffn_jax/hf/export.py) and imported again: the same model
    config and bit-identical parameters."""
    from vffn_jax.hf import export as hf_export

    first = Path(runs["gqa"]["out"])
    hf_export.export(first, hf["root"] / "roundtrip_hf")
    again = importer.import_hf(hf["root"] / "roundtrip_hf", hf["root"] / "run_roundtrip")
    a, b = restore_params(first), restore_params(again["out"])
    assert a.cfg.model == b.cfg.model
    pa, pb = kv_cache.pure_params(a.params), kv_cache.pure_params(b.params)
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _llama31_config() -> dict:
    """Llama 3.1 8B's config.json as published (older transformers: top-level rope_theta and rope_scaling)."""
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
            "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}


def test_config_fields_old_and_new_formats():
    """The same overrides from the published (older) config.json and from transformers 5's own reading of it
    (rope_parameters); Mistral without a sliding window and a Llama under another model_type are accepted."""
    from vffn_jax.config import ConfigError
    from vffn_jax.hf import hf_config

    old = _llama31_config()
    expected = {"model.vocab_size": 128256, "model.d_model": 4096, "model.n_layers": 32, "model.n_heads": 32,
                "model.n_kv_heads": 8, "model.d_ff": 14336, "model.norm_eps": 1e-5, "model.tie_embeddings": False,
                "model.rope_theta": 500000.0, "model.rope_scaling": "llama3", "model.rope_factor": 8.0,
                "model.rope_low_freq_factor": 1.0, "model.rope_high_freq_factor": 4.0,
                "model.rope_original_max_len": 8192, "train.seq_len": 4096}
    assert hf_config.overrides(old) == expected
    new = transformers.LlamaConfig(**{k: v for k, v in old.items() if k != "model_type"}).to_dict()
    assert "rope_parameters" in new
    assert hf_config.overrides(new) == expected
    assert hf_config.eos_token_ids(old) == [128001, 128008, 128009]

    mistral = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
                                         vocab_size=300).to_dict()
    got = hf_config.overrides(mistral)
    assert got["model.n_kv_heads"] == 1 and got["model.rope_scaling"] == "none" and got["train.seq_len"] == 4096
    lookalike = {**transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=300).to_dict(), "model_type": "my_llama"}
    assert hf_config.overrides(lookalike)["model.n_kv_heads"] == 0
    with pytest.raises(ConfigError, match="embedding_multiplier"):
        hf_config.overrides({**lookalike, "embedding_multiplier": 12.0})
    with pytest.raises(ConfigError, match="sliding_window"):  # MistralConfig's default window
        hf_config.overrides({k: v for k, v in mistral.items() if k != "sliding_window"})
    with pytest.raises(ConfigError, match="use_qk_norm"):
        hf_config.overrides({**old, "use_qk_norm": True})


def _bad_folder(hf, name: str, edit_config=None, weights=True) -> Path:
    folder = hf["root"] / f"bad_{name}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(hf["gqa"][0], folder)
    if not weights:
        for f in folder.glob("*.safetensors"):
            f.unlink()
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _edit_weights(hf, name: str, edit) -> Path:
    from safetensors.numpy import load_file, save_file

    folder = _bad_folder(hf, name)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


UP1 = "model.layers.1.mlp.up_proj.weight"


BAD = {
    "no_config": (lambda hf: hf["root"], "config.json"),
    "no_safetensors": (lambda hf: _bad_folder(hf, "noweights", weights=False), "safetensors"),
    "attention_bias": (lambda hf: _bad_folder(hf, "bias", lambda c: c.update(attention_bias=True)), "attention_bias"),
    "mlp_bias": (lambda hf: _bad_folder(hf, "mlpbias", lambda c: c.update(mlp_bias=True)), "mlp_bias"),
    "sliding_window": (lambda hf: _bad_folder(hf, "window", lambda c: c.update(model_type="mistral",
                                                                             sliding_window=4096)), "sliding_window"),
    "rope_type": (lambda hf: _bad_folder(hf, "yarn", lambda c: c.update(
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})), "rope_type"),
    "old_rope_scaling": (lambda hf: _bad_folder(hf, "linear", lambda c: (c.pop("rope_parameters"), c.update(
        rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}))), "rope_scaling.rope_type"),
    "qk_norm": (lambda hf: _bad_folder(hf, "qwen3", lambda c: c.update(model_type="qwen3")), "model_type"),
    "hidden_act": (lambda hf: _bad_folder(hf, "gelu", lambda c: c.update(hidden_act="gelu")), "hidden_act"),
    "head_dim": (lambda hf: _bad_folder(hf, "headdim", lambda c: c.update(head_dim=16)), "head_dim"),
    "missing_key": (lambda hf: _bad_folder(hf, "nolayers", lambda c: c.pop("num_hidden_layers")), "num_hidden_layers"),
    "wrong_shape": (lambda hf: _edit_weights(hf, "shape", lambda t: t.update({UP1: t[UP1][:-1]})), UP1),
    "int_tensor": (lambda hf: _edit_weights(hf, "int", lambda t: t.update({UP1: t[UP1].astype(np.int32)})),
                   f"{UP1!r} in model.safetensors is I32"),
    "extra_bias": (lambda hf: _edit_weights(hf, "extra", lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})), "model.layers.0.self_attn.q_proj.bias"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_naming_the_field(hf, case, capsys):
    make, field = BAD[case]
    out = hf["root"] / f"out_{case}"
    rc = hf_cli.import_main(["--hf", str(make(hf)), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and field in err, err
    assert not out.exists() and not list(hf["root"].glob(f".out_{case}.tmp-*"))  # nothing written, not even half


@pytest.mark.parametrize("name", ["gqa", "llama3"])  # one file (listed when opened), a shard of an index (read later)
def test_truncated_safetensors_exits_2_naming_the_file(hf, tmp_path, name):
    folder = tmp_path / "hf"
    shutil.copytree(hf[name][0], folder)
    weights = sorted(folder.glob("*.safetensors"))[-1]
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted download
    res = cli.call(hf_cli.main, "import", "--hf", folder, "--out", tmp_path / "run")
    assert res.returncode == 2, res.stderr
    assert f"error: {weights} is not a readable safetensors file" in res.stderr and "download it again" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written, not even a temporary folder


def test_import_from_and_into_gcs(hf, runs, gcs_bucket):
    """--hf gs://... (sharded: index and several files) and --out gs://...: the same run as the local import,
    its tokenizer inside the gs:// run; a second import into it, and a missing gs:// folder, exit 2 naming them."""
    from vffn_jax import storage

    src, out = f"{gcs_bucket}/hf/llama3", f"{gcs_bucket}/runs/llama3"
    storage.upload_tree(hf["llama3"][0], src)
    res = cli.call(hf_cli.main, "import", "--hf", src, "--out", out)
    assert res.returncode == 0, res.stderr
    assert f"imported {src} " in res.stdout and f"-> {out}:" in res.stdout
    ours, local = restore_params(out), restore_params(runs["llama3"]["out"])
    assert ours.cfg.model == local.cfg.model and ours.cfg.scale == local.cfg.scale == "hf:llama3"
    for x, y in zip(jax.tree.leaves(kv_cache.pure_params(ours.params)), jax.tree.leaves(kv_cache.pure_params(local.params))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert ours.cfg.data.tokenizer == f"{out}/tokenizer/tokenizer.json"
    assert load_tokenizer(ours.cfg.data.tokenizer).eos_id == ours.cfg.model.eos_id == hf["tok"].eos_token_id

    again = cli.call(hf_cli.main, "import", "--hf", src, "--out", out)
    assert again.returncode == 2 and f"--out={out} already holds checkpoints" in again.stderr, again.stderr
    missing = cli.call(hf_cli.main, "import", "--hf", f"{gcs_bucket}/hf/none", "--out", f"{gcs_bucket}/runs/none")
    assert missing.returncode == 2 and f"--hf={gcs_bucket}/hf/none: no such folder" in missing.stderr, missing.stderr
    assert "Traceback" not in again.stderr + missing.stderr
    assert not storage.as_path(f"{gcs_bucket}/runs/none").exists()


def test_refuses_an_out_with_checkpoints(hf, runs, capsys):
    before = sorted(p.name for p in Path(runs["gqa"]["out"]).iterdir())
    assert hf_cli.import_main(["--hf", str(hf["gqa"][0]), "--out", runs["gqa"]["out"]]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in Path(runs["gqa"]["out"]).iterdir()) == before


def test_help_explains_every_flag():

    res = cli.call(hf_cli.main, "import", "--help")  # `python -m vffn_jax.hf import --help`
    assert res.returncode == 0, res.stderr
    for flag in ("--hf", "--out", "--variant", "--set", "--dtype"):
        assert flag in res.stdout
    assert "vffn-hf import" in res.stdout
