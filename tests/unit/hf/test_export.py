"""vffn_jax/hf/export.py and the modeling code it ships: every FFN kind exported, loaded by transformers'
own AutoModelForCausalLM, and checked against vffn_jax on logits, per-token depth and greedy generation.

Tiny random models (d_model 32, 2 layers, byte tokenizer, 264 embedding rows so that padded rows exist),
weights at std 0.2 so that tokens get different depths and experts. One params-only run and one
export per kind, built once per module; each custom export has its own folder name, because transformers
caches remote modules by folder name."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vffn_jax import config as config_lib  # noqa: E402
from vffn_jax.config import DEPTH_KINDS, FFN_KINDS  # noqa: E402
from vffn_jax.hf import export as hf_export  # noqa: E402
from vffn_jax.infer import decode, sampling  # noqa: E402
from vffn_jax.testing import cli  # noqa: E402
from vffn_jax.cli import hf as hf_cli  # noqa: E402
from vffn_jax.model import kv_cache  # noqa: E402
SMALL = {"model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2, "model.d_ff": 64, "model.init_std": 0.2,
         "model.vocab_size": 264, "model.n_experts": 4, "model.top_k": 2, "model.max_depth": 4, "model.n_loops": 3,
         "train.seq_len": 48, "train.batch_size": 8, "run.async_checkpointing": False}
EOS = 256
VOCAB = 257  # the byte tokenizer's; the model has 264 rows
PROMPTS = ["Héllo wörld", "∑ x²"]  # non-ASCII: several bytes per character
# grouped-query attention, tied embeddings and Llama 3 RoPE scaling (short original context: every band in use)
GQA_TIED = {"model.n_heads": 4, "model.n_kv_heads": 2, "model.tie_embeddings": True, "model.rope_scaling": "llama3",
            "model.rope_factor": 4.0, "model.rope_original_max_len": 16}


def _random_params(m, seed: int = 0):
    """An `nnx.State` of random host arrays in the checkpoint layout: weights normal(0, 0.2), so routers pick
    different depths and experts per token, and norm scales around 1 (not all ones: a misplaced norm shows).
    Host arrays need no compiled init program, which costs seconds per kind on a cold compile cache."""
    from flax import nnx

    from vffn_jax.model import placement

    _, abstract = placement.abstract_model(m)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        scale = 1 + 0.1 * rng.standard_normal(leaf.shape) if "norm" in str(path[-1]) else 0.2 * rng.standard_normal(
            leaf.shape)
        return np.asarray(scale, np.float32)

    values = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract))
    if "lm_head" in values:  # padded vocabulary rows that would win the argmax unless generation masks them
        values["lm_head"][:, VOCAB:] *= 8
    nnx.replace_by_pure_dict(abstract, values)
    return abstract, values


def _make_run(root: Path, kind: str, overrides=None) -> tuple[Path, object, dict]:
    """A params-only run directory (no training): (workdir, config, params as a nested dict of host arrays)."""
    from vffn_jax.checkpoint import manager as ckpt
    from vffn_jax.rundir import RunDir

    cfg = config_lib.load_config("tiny", kind, {**SMALL, **(overrides or {})})
    workdir = root / "run"
    RunDir.at(workdir).prepare(cfg, True)
    state, params = _random_params(cfg.model)
    manager = ckpt.make_manager(workdir, cfg.run)
    ckpt.save(manager, 3, state, None, force=True)
    ckpt.wait_until_finished(manager)
    manager.close()
    return workdir, cfg, params


class Exported:
    def __init__(self, root: Path, kind: str, name: str, overrides=None, **export_kw):
        self.kind = kind
        self.workdir, self.cfg, self.params = _make_run(root, kind, overrides)
        self.dir = root / name
        self.info = hf_export.export(self.workdir, self.dir, **export_kw)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(self.dir), trust_remote_code=kind != "dense", dtype=torch.float32)
        self.model.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Exported]:
    return {k: Exported(tmp_path_factory.mktemp(k), k, f"export_test_{k}") for k in FFN_KINDS}


def _tokens(b=2, t=12, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (b, t)).astype(np.int32)


def _compare_logits(e: Exported, toks):
    """HF logits (f32) equal vffn_jax's prefill logits; per-token depths equal layer by layer."""
    m = e.cfg.model
    logits, _, depth, _, _ = kv_cache.prefill(m, e.params, jnp.asarray(toks), jnp.full((toks.shape[0],), toks.shape[1]),
                                            toks.shape[1], all_logits=True)
    with torch.no_grad():
        hf = e.model(torch.from_numpy(toks).long()).logits.numpy()
    np.testing.assert_allclose(hf, np.asarray(logits), atol=1e-4, rtol=0)
    depth = np.asarray(depth)  # [B, T, layers]
    if m.ffn in DEPTH_KINDS:
        assert len(np.unique(depth)) > 1, "tokens of different depths are what this test is about"
        for i, layer in enumerate(e.model.model.layers):
            np.testing.assert_array_equal(layer.mlp.last_depth.numpy(), depth[..., i])


@pytest.mark.parametrize("kind", FFN_KINDS)
def test_logits_and_depths_match_vffn_jax(exports, kind):
    e = exports[kind]
    _compare_logits(e, _tokens())
    config = json.loads((e.dir / "config.json").read_text())
    if kind == "dense":
        assert config["model_type"] == "llama" and "auto_map" not in config
        assert not list(e.dir.glob("*.py"))
    else:
        assert config["model_type"] == "vffn" and config["ffn"] == kind and config["n_top_experts"] == 2
        assert "top_k" not in config  # generate() would read it as a sampling default
        assert (e.dir / "modeling_vffn.py").is_file() and (e.dir / "configuration_vffn.py").is_file()
    assert config["max_position_embeddings"] == 48 and config["eos_token_id"] == EOS


def _hf_greedy(model, prompts_ids: list[list[int]], max_new: int) -> list[list[int]]:
    """Batched greedy generate() with left padding, each row cut after its first EOS."""
    width = max(map(len, prompts_ids))
    ids = torch.full((len(prompts_ids), width), EOS, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return rows


@pytest.mark.parametrize("kind", FFN_KINDS)
def test_greedy_generate_matches_vffn_jax(exports, kind):
    e = exports[kind]
    prompts = [[EOS] + list(p.encode()) for p in PROMPTS]
    gens, _ = decode.generate(e.cfg.model, e.params, prompts, max_new_tokens=10, context=48,
                              sampling_cfg=sampling.SamplingConfig(temperature=0.0), eos_id=EOS, valid_vocab=VOCAB)
    assert _hf_greedy(e.model, prompts, 10) == [g.ids for g in gens]
    if kind == "dense":  # the padded rows would be generated without generation_config's suppress_tokens
        with torch.no_grad():
            free = e.model.generate(input_ids=torch.tensor(prompts[:1]), max_new_tokens=10, do_sample=False,
                                    suppress_tokens=None)
        assert max(free[0, len(prompts[0]):].tolist()) >= VOCAB


def test_generate_cli_matches_hf(exports):
    """`generate.py ... --temperature 0 --json` (its main, in-process), against HF generate() on the exported
    tokenizer."""
    import generate

    e = exports["versatile"]
    text = PROMPTS[0]
    proc = cli.call(generate.main, "--workdir", e.workdir, "--prompt", text, "--temperature", "0",
                    "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    ours = [t["id"] for t in json.loads(proc.stdout)["generations"][0]["tokens"]]
    tok = transformers.AutoTokenizer.from_pretrained(str(e.dir), trust_remote_code=True)
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]  # generate.py's EOS prefix
    assert ids == [EOS] + list(text.encode())
    assert _hf_greedy(e.model, [ids], 12) == [ours]


def test_dense_is_a_stock_llama(exports):
    e = exports["dense"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(e.dir), trust_remote_code=False)
    assert type(model) is transformers.LlamaForCausalLM
    config = transformers.AutoConfig.from_pretrained(str(e.dir))
    assert config.architectures == ["LlamaForCausalLM"] and config.hidden_act == "silu"
    assert not config.attention_bias and not config.mlp_bias and not config.tie_word_embeddings
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    gen = json.loads((e.dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == EOS and gen["suppress_tokens"] == list(range(VOCAB, 264))
    assert not {"do_sample", "temperature", "top_k", "top_p"} & set(gen)


@pytest.mark.parametrize("kind", ["dense", "versatile"])
def test_gqa_tied_embeddings_and_llama3_rope(tmp_path, kind):
    e = Exported(tmp_path, kind, f"export_test_{kind}_gqa_tied", GQA_TIED)
    config = transformers.AutoConfig.from_pretrained(str(e.dir), trust_remote_code=kind != "dense")
    assert config.num_key_value_heads == 2 and config.num_attention_heads == 4 and config.tie_word_embeddings
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["original_max_position_embeddings"] == 16
    from safetensors import safe_open

    with safe_open(str(e.dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names
        assert tuple(f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()) == (2 * 8, 32)
    assert e.model.lm_head.weight.data_ptr() == e.model.model.embed_tokens.weight.data_ptr()
    _compare_logits(e, _tokens(t=40, seed=1))  # positions past the original context of 16


def test_sharded_export_writes_an_index_and_loads(exports, tmp_path):
    e = exports["versatile"]
    out = tmp_path / "export_test_versatile_sharded"
    assert hf_cli.export_main(["--workdir", str(e.workdir), "--out", str(out), "--max-shard-size", "40KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == (e.dir / "model.safetensors").stat().st_size - _header_bytes(
        e.dir / "model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32)
    toks = torch.from_numpy(_tokens()).long()
    with torch.no_grad():
        np.testing.assert_array_equal(model(toks).logits.numpy(), e.model(toks).logits.numpy())


def _header_bytes(path: Path) -> int:
    """Bytes of a safetensors file before its tensor data (8-byte length + JSON header)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_bfloat16_export(exports, tmp_path):
    e = exports["moe"]
    out = tmp_path / "export_test_moe_bf16"
    info = hf_export.export(e.workdir, out, dtype="bfloat16")
    assert info["dtype"] == "bfloat16" and info["param_bytes"] * 2 == e.info["param_bytes"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    assert model.dtype == torch.bfloat16  # config.json's dtype
    toks = torch.from_numpy(_tokens()).long()
    with torch.no_grad():
        rounded = model.float()(toks).logits.numpy()  # the bf16-rounded weights, computed in f32
        exact = e.model(toks).logits.numpy()
    assert np.abs(rounded - exact).max() < 0.05 * np.abs(exact).max()  # bf16 rounding, not a wrong tensor


def test_byte_tokenizer_equals_vffn_jax(exports):
    from vffn_jax.data.tokenizer import ByteTokenizer

    ours = ByteTokenizer()
    tok = transformers.AutoTokenizer.from_pretrained(str(exports["dense"].dir))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == EOS and len(tok) == 257
    for text in ["Héllo wörld ∑ x² 🙂", "  two  spaces\nand\ttabs ", "日本語", "", "a<|endoftext|>b"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(text)
        assert tok.decode(ids) == ours.decode(ids) == text
    broken = list("é".encode())[:1] + [104, EOS, 105]  # a cut UTF-8 sequence and an EOS
    assert tok.decode(broken, skip_special_tokens=True) == ours.decode(broken)


def test_json_tokenizer_file_is_copied(tmp_path):
    from vffn_jax.data import tokenizer as tok_lib
    from vffn_jax.hf import tokenizer_files

    try:
        path = tok_lib.olmo_tokenizer_path()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))
    info = tokenizer_files.write(str(path), tmp_path, context=64)
    assert (tmp_path / "tokenizer.json").read_bytes() == path.read_bytes()
    ours = tok_lib.load_tokenizer(str(path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.eos_token_id == ours.eos_id == info["eos_id"]
    text = "Héllo wörld, the quick brown fox ∑ x² 🙂"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_bad_input_exits_2(exports, tmp_path, capsys):
    run = exports["versatile"].workdir
    assert hf_cli.export_main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    assert hf_cli.export_main(["--workdir", str(run), "--out", str(full)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert hf_cli.export_main(["--workdir", str(run), "--out", str(tmp_path / "b"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size" in capsys.readouterr().err
    assert hf_cli.export_main(["--workdir", str(run), "--out", str(tmp_path / "c"), "--step", "9"]) == 2
    assert "no checkpoint for step 9" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written, no temporary folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert hf_cli.export_main(["--workdir", str(run), "--out", str(empty)]) == 0  # an empty folder is fine
    umask = os.umask(0)
    os.umask(umask)
    assert (empty / "config.json").is_file() and empty.stat().st_mode & 0o777 == 0o777 & ~umask


def test_overwrite_replaces_a_non_empty_out(tmp_path):
    """A non-empty --out is refused naming it; --overwrite replaces it whole (no stale weights left beside the new
    ones, no temporary folder), but never the run being exported or a folder holding it."""
    workdir, _, _ = _make_run(tmp_path / "src", "dense")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_text("a stale shard")
    res = cli.call(hf_cli.main, "export", "--workdir", workdir, "--out", out)
    assert res.returncode == 2, res.stderr
    assert f"error: --out={out} already exists and is not an empty folder" in res.stderr and "--overwrite" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    res = cli.call(hf_cli.main, "export", "--workdir", workdir, "--out", out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert not (out / "model-00001-of-00002.safetensors").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "src"]
    res = cli.call(hf_cli.main, "export", "--workdir", workdir, "--out", tmp_path / "src", "--overwrite")
    assert res.returncode == 2 and "--overwrite would delete it" in res.stderr, res.stderr
    assert (workdir / "config.json").is_file()


def test_help_explains_every_flag():
    text = hf_cli.export_parser().format_help()
    for flag in ("--workdir", "--out", "--step", "--dtype", "--max-shard-size", "--overwrite"):
        assert flag in text
    assert "trust_remote_code" in text and "index" in text
