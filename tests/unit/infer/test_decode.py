"""KV-cache decoding (vffn_jax/infer/decode.py), sampling and generate.py.

The central check: prefill + one-token cached steps give the full forward's logits (and each token's
per-layer depth) at every position, for every FFN variant, with rows of different prompt lengths."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vffn_jax.infer import decode
from vffn_jax.infer import sampling
from vffn_jax.model import placement
from vffn_jax.config import FFN_KINDS, ConfigError, ModelConfig, MeshConfig
from vffn_jax.model.transformer import Transformer
from vffn_jax.testing import cli
from vffn_jax.testing.shapes import small_model  # init_std 0.2: a wrong depth shows in the logits
from vffn_jax.model.config import loops_per_layer
from vffn_jax.model import kv_cache

B, T, T_PROMPT, S = 3, 10, 8, 16
LENGTHS = np.array([3, 5, 1], np.int32)


def build(m: ModelConfig, seed=0):
    g, st = nnx.split(Transformer(m, nnx.Rngs(seed)))
    return g, st


def full_forward(g, st, toks):
    return jax.jit(lambda s, t: nnx.merge(g, s)(t))(st, toks)


def teacher_forced(m, params, toks, lengths):
    """Prefill each row's first `lengths[b]` tokens, then feed the rest one per step (rows advance
    independently). Returns per-(row, position) logits and depth, and the executed loops per step."""
    pre = jax.jit(functools.partial(kv_cache.prefill, m, cache_len=S, all_logits=True))
    step = jax.jit(functools.partial(kv_cache.decode_step, m))
    tp = np.where(np.arange(T_PROMPT)[None] < lengths[:, None], np.asarray(toks)[:, :T_PROMPT], 0)
    logits_p, cache, depth_p, _, seg = pre(params, jnp.asarray(tp), jnp.asarray(lengths))
    logits = np.full((B, T, m.vocab_size), np.nan, np.float32)
    depth = np.zeros((B, T, m.n_layers), np.int32)
    for b in range(B):
        logits[b, :lengths[b]] = np.asarray(logits_p[b, :lengths[b]])
        depth[b, :lengths[b]] = np.asarray(depth_p[b, :lengths[b]])
    steps = []
    for j in range(T - lengths.min()):
        pos = lengths + j
        active = pos < T
        feed = np.asarray(toks)[np.arange(B), np.minimum(pos, T - 1)]
        if m.doc_mask:  # document index of the fed token: EOS tokens strictly before it
            seg = jnp.asarray([int(np.sum(np.asarray(toks)[b, :pos[b]] == m.eos_id)) for b in range(B)])
        lg, cache, d, loops = step(params, cache, jnp.asarray(feed), jnp.asarray(pos), seg, jnp.asarray(active))
        lg, d = np.asarray(lg), np.asarray(d)
        for b in np.flatnonzero(active):
            logits[b, pos[b]], depth[b, pos[b]] = lg[b], d[b]
        steps.append((active, d, np.asarray(loops)))
    return logits, depth, steps


@pytest.mark.parametrize("ffn", FFN_KINDS)
def test_cache_matches_full_forward_every_position(ffn):
    m = small_model(ffn)
    g, st = build(m)
    toks = jax.random.randint(jax.random.key(1), (B, T), 0, m.vocab_size)
    full, aux = full_forward(g, st, toks)
    logits, depth, steps = teacher_forced(m, kv_cache.pure_params(st), toks, LENGTHS)
    assert not np.isnan(logits).any()
    np.testing.assert_allclose(logits, np.asarray(full), rtol=1e-4, atol=2e-5)
    if "depth" in aux:  # each token's own depth equals the full forward's, layer by layer
        np.testing.assert_array_equal(depth, np.moveaxis(np.asarray(aux["depth"]), 0, -1))
        assert len(np.unique(depth)) > 1, "the test should see tokens of different depths"
        for active, d, loops in steps:  # executed loops per row (depth_exec=compact, blocks of 1 row for 3 rows):
            np.testing.assert_allclose(loops, np.where(active[:, None], d, 1).mean(axis=0))  # each row its own
            assert (d[~active] == 1).all()  # finished rows never extend the loop
    else:
        fixed = loops_per_layer(m)
        assert (depth == fixed).all() and all((lo == fixed).all() for _, _, lo in steps)


def test_cache_holds_only_the_key_value_heads_and_matches_the_full_forward():
    """Grouped-query attention (4 query heads, 1 key/value head) with a tied head: the cache is 4x smaller and
    the cached steps still give the full forward's logits."""
    m = small_model("versatile", n_heads=4, n_kv_heads=1, tie_embeddings=True)
    g, st = build(m)
    toks = jax.random.randint(jax.random.key(4), (B, T), 0, m.vocab_size)
    full, _ = full_forward(g, st, toks)
    _, cache, *_ = jax.eval_shape(functools.partial(kv_cache.prefill, m, cache_len=S), kv_cache.pure_params(st),
                                  toks[:, :T_PROMPT], jnp.asarray(LENGTHS))  # the cache's shape, nothing compiled
    assert cache["k"].shape == (m.n_layers, B, S, 1, m.head_dim)
    logits, _, _ = teacher_forced(m, kv_cache.pure_params(st), toks, LENGTHS)
    np.testing.assert_allclose(logits, np.asarray(full), rtol=1e-4, atol=2e-5)


def test_cache_matches_full_forward_with_document_mask():
    m = small_model("versatile", doc_mask=True, eos_id=5)
    g, st = build(m)
    toks = np.array(jax.random.randint(jax.random.key(2), (B, T), 0, m.vocab_size))
    toks[:, [1, 6]] = 5  # an EOS inside the prompt of rows 1 (length 5) and inside the decoded part
    full, _ = full_forward(g, st, jnp.asarray(toks))
    logits, _, _ = teacher_forced(m, kv_cache.pure_params(st), toks, LENGTHS)
    np.testing.assert_allclose(logits, np.asarray(full), rtol=1e-4, atol=2e-5)


def _prompts(vocab, lengths=(4, 7, 2), seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_greedy_generation_is_the_full_forward_argmax():
    m = small_model("versatile", depth_exec="masked")  # masked: a step runs every row as deep as its deepest row
    g, st = build(m)
    prompts = _prompts(m.vocab_size)
    gens, stats = decode.generate(m, st, prompts, max_new_tokens=6, context=32,
                                  sampling_cfg=sampling.SamplingConfig(temperature=0.0), valid_vocab=60)
    assert stats.decode_steps == 5 and stats.step_loops.shape == (5, m.n_layers)
    for gen in gens:
        assert len(gen.ids) == 6 and gen.finish_reason == "length" and max(gen.ids) < 60
        seq = jnp.asarray([gen.prompt_ids + gen.ids])
        full, aux = full_forward(g, st, seq)
        n = len(gen.prompt_ids)
        pred = np.asarray(full[0, n - 1:-1])  # the logits that chose each generated token
        np.testing.assert_array_equal(np.argmax(pred[:, :60], -1), gen.ids)
        logp = jax.nn.log_softmax(jnp.where(jnp.arange(m.vocab_size) < 60, pred, -jnp.inf), -1)
        np.testing.assert_allclose(gen.logprobs, np.asarray(logp)[np.arange(6), gen.ids], atol=1e-4)
        np.testing.assert_array_equal(gen.depth, np.asarray(aux["depth"])[:, 0, n - 1:-1].T)
        assert (gen.loops >= gen.depth).all()  # a step runs as deep as its deepest row
    all_depth = np.stack([gen.depth[1:] for gen in gens])  # [rows, steps, layers]
    np.testing.assert_array_equal(stats.step_loops, all_depth.max(0))


def test_eos_ends_only_its_row():
    """A row that samples the EOS token stops there ("eos"); the other rows are unaffected."""
    m = small_model("depth_only")
    _, st = build(m)
    prompts = _prompts(m.vocab_size)
    greedy = sampling.SamplingConfig(temperature=0.0)
    ref, _ = decode.generate(m, st, prompts, max_new_tokens=5, context=32, sampling_cfg=greedy)
    ids = ref[1].ids
    i = max(j for j in range(len(ids)) if ids[j] not in ids[:j])  # stop row 1 at the last new token it makes
    gens, _ = decode.generate(m, st, prompts, max_new_tokens=5, context=32, sampling_cfg=greedy, eos_id=ids[i])
    assert gens[1].ids == ids[:i + 1] and gens[1].finish_reason == ("eos")
    eos = ids[i]
    for a, b in zip(gens, ref):  # other rows unaffected (unless they hit the same token)
        if eos not in b.ids:
            assert a.ids == b.ids and (a.depth == b.depth).all()


def test_rows_end_at_the_context():
    """A row ends ("context") when its next token would not fit; a prompt longer than the context is refused."""
    m = small_model("depth_only")
    _, st = build(m)
    greedy = sampling.SamplingConfig(temperature=0.0)
    gens, _ = decode.generate(m, st, _prompts(m.vocab_size), max_new_tokens=20, context=9, sampling_cfg=greedy)
    for gen in gens:  # a row ends when its next token would not fit: prompt + generated <= context + 1
        assert len(gen.prompt_ids) + len(gen.ids) == 10 and gen.finish_reason == "context"
    with pytest.raises(ConfigError, match="context"):
        decode.generate(m, st, [[1] * 10], max_new_tokens=2, context=9)


def test_a_sample_does_not_depend_on_its_batch_companions():
    """Sampling (temperature 1, top-p): a prompt's sample is the same alone and in a batch; seeds reproduce."""
    m = small_model("depth_only")
    _, st = build(m)
    prompts = _prompts(m.vocab_size)
    s = sampling.SamplingConfig(temperature=1.0, top_p=0.9)
    both, _ = decode.generate(m, st, prompts[:2], max_new_tokens=5, context=32, sampling_cfg=s, seed=7)
    alone, _ = decode.generate(m, st, prompts[:1], max_new_tokens=5, context=32, sampling_cfg=s, seed=7)
    assert both[0].ids == alone[0].ids
    other, _ = decode.generate(m, st, prompts[:1], max_new_tokens=5, context=32, sampling_cfg=s, seed=8)
    assert other[0].ids != alone[0].ids  # another seed, another sample (fixed seeds: deterministic)


def test_sharded_decode_matches_one_device():
    """A (2,2,2) mesh: cache rows over data x fsdp, heads and FFN hidden units over tensor; same tokens,
    depths and log-probs as one device."""
    m = small_model("versatile")
    from vffn_jax.parallel import sharding as shd

    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    _, params1 = build(m, seed=1)  # one set of weights, placed twice (no compiled init per mesh)
    params = jax.device_put(params1, shd.state_shardings(placement.abstract_model(m)[1], mesh))
    prompts = _prompts(m.vocab_size)
    kw = dict(max_new_tokens=5, context=32, sampling_cfg=sampling.SamplingConfig(temperature=0.0))
    sharded, _ = decode.generate(m, params, prompts, mesh=mesh, **kw)
    single, _ = decode.generate(m, params1, prompts, **kw)
    for a, b in zip(sharded, single):
        assert a.ids == b.ids and (a.depth == b.depth).all()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_greedy_is_the_same_alone_and_in_a_batch_of_other_lengths():
    m = small_model("versatile")
    _, st = build(m)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, m.vocab_size, n)) for n in (4, 9, 1, 6)]  # shorter and longer companions
    kw = dict(max_new_tokens=6, context=32, sampling_cfg=sampling.SamplingConfig(temperature=0.0))
    batch, _ = decode.generate(m, st, prompts, **kw)
    for i, prompt in enumerate(prompts):
        (alone,), _ = decode.generate(m, st, [prompt], **kw)
        assert alone.ids == batch[i].ids and (alone.depth == batch[i].depth).all()
        np.testing.assert_allclose(alone.logprobs, batch[i].logprobs, atol=1e-5)
    hits = decode.make_decoder.cache_info().hits
    again, _ = decode.generate(m, st, prompts, **kw)
    assert [g.ids for g in again] == [g.ids for g in batch]  # greedy is deterministic
    assert decode.make_decoder.cache_info().hits == hits + 1  # the same shapes reuse the compiled programs


@pytest.mark.parametrize("top_k,top_p,allowed", [(0, 1.0, 4), (2, 1.0, 2), (0, 0.8, 2), (3, 0.9, 3)])
def test_sampling_frequencies_match_the_softmax_of_the_allowed_set(top_k, top_p, allowed):
    probs = np.asarray([0.5, 0.3, 0.15, 0.05])
    n = 20000  # one row per draw: every row has its own key
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 1))
    cfg = sampling.SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p)
    draws = np.asarray(sampling.sample(logits, cfg, jax.random.key(0), jnp.arange(n), 0))
    assert draws.max() < allowed  # never a token outside the top-k / top-p set
    expected = probs[:allowed] / probs[:allowed].sum()
    freq = np.bincount(draws, minlength=4)[:allowed] / n
    np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(expected * (1 - expected) / n).max())
    again = np.asarray(sampling.sample(logits, cfg, jax.random.key(0), jnp.arange(n), 0))
    np.testing.assert_array_equal(draws, again)  # a seed reproduces its samples


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    np.testing.assert_array_equal(np.isfinite(sampling.filter_logits(logits, top_k=2)), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(sampling.filter_logits(logits, top_p=0.8)), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(sampling.filter_logits(logits, top_p=0.81)), [[1, 1, 1, 0]])
    np.testing.assert_array_equal(np.isfinite(sampling.filter_logits(logits, top_p=0.1)), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(sampling.mask_vocab(logits, 3)), [[1, 1, 1, 0]])
    key, rows = jax.random.key(0), jnp.arange(1)
    greedy = sampling.sample(logits, sampling.SamplingConfig(temperature=0.0), key, rows, 0)
    assert int(greedy[0]) == 0
    draws = [int(sampling.sample(logits, sampling.SamplingConfig(1.0, top_k=2), key, rows, t)[0]) for t in range(40)]
    assert set(draws) == {0, 1}
    for bad in (sampling.SamplingConfig(temperature=-0.1), sampling.SamplingConfig(top_p=0.0),
                sampling.SamplingConfig(top_p=1.5), sampling.SamplingConfig(top_k=-1)):
        with pytest.raises(ConfigError):
            sampling.validate(bad)


# --------------------------------------------------------------------------- generate.py


@pytest.fixture(scope="module")
def run_dir(params_only_run):
    """The session's params-only run of a tiny versatile model (byte tokenizer, context 48). Read-only."""
    return params_only_run


def _main(*args):
    import generate

    r = cli.call(generate.main, *args)
    return r.returncode, r.stdout, r.stderr


def test_cli_json_and_text(run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "And God said"}\n\n"Let there be"\n')
    rc, out, err = _main("--workdir", run_dir, "--prompts", prompts, "--prompt", "", "--max-new-tokens",
                         6, "--seed", 3, "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["step"] == 3 and r["ffn"] == "versatile" and r["n_layers"] == 2 and r["max_depth"] == 4
    assert [g["prompt"] for g in r["generations"]] == ["", "And God said", "Let there be"]
    assert r["generations"][1]["prompt_tokens"] == 1 + len("And God said")  # EOS prefix
    for g in r["generations"]:
        assert 1 <= g["n_tokens"] <= 6 and len(g["tokens"]) == g["n_tokens"]
        for t in g["tokens"]:
            assert len(t["depth"]) == 2 and all(1 <= d <= 4 for d in t["depth"])
            assert all(1 <= lo <= 4 for lo in t["loops"])  # executed loops per row of the step (compact: fractional)
            assert t["logprob"] <= 0 and 0 <= t["id"] < 257
    rc, out2, _ = _main("--workdir", run_dir, "--prompts-file", prompts, "--prompt", "", "--max-new-tokens", 6,
                        "--seed", 3, "--json")
    assert json.loads(out2)["generations"] == r["generations"]  # reproducible
    rc, text, _ = _main("--workdir", run_dir, "--prompt", "Amen", "--max-new-tokens", 4, "--temperature", 0,
                        "--depth-marks", "brackets")
    assert rc == 0 and "Amen" in text and text.count("[") >= 1 and "]" in text
    rc, text, _ = _main("--workdir", run_dir, "--prompt", "Amen", "--max-new-tokens", 4, "--temperature", 0,
                        "--depth-marks", "color")
    assert rc == 0 and "\x1b[30;48;5;" in text


@pytest.mark.parametrize("args,match", [
    (["--prompt", "x" * 48], "longer than the model's context"),
    (["--prompts-file", "EMPTY"], "holds no prompt"),
    (["--prompts-file", "MISSING"], "not found"),
    (["--prompts", "BAD.jsonl"], "line 1: expected a JSON string or an object"),
    ([], "nothing to continue"),
    (["--prompt", "a", "--step", "7"], "no checkpoint for step 7"),
    (["--prompt", "a", "--top-p", "0"], "--top-p"),
    (["--prompt", "a", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "a", "--temperature", "-1"], "--temperature"),
    (["--prompt", "a", "--top-k", "-2"], "--top-k"),
    (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "", "--no-eos-prefix"], "empty"),
])
def test_cli_bad_input_exits_2(run_dir, tmp_path, args, match):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no prompt field"}\n')
    files = {"EMPTY": str(empty), "MISSING": str(tmp_path / "nope.txt"), "BAD.jsonl": str(bad)}
    args = [files.get(a, a) for a in args]
    rc, out, err = _main("--workdir", run_dir, *args)
    assert rc == 2 and err.startswith("error: ") and match in err, err
    assert out == ""


def test_cli_missing_run(tmp_path):
    rc, _, err = _main("--workdir", tmp_path / "none", "--prompt", "a")
    assert rc == 2 and "does not exist" in err
