"""lm-evaluation-harness on a vffn_jax run: an lm-eval model backend (`vffn_jax`) and a command line.

    vffn-lm-eval --workdir runs/tiny --tasks vffn_downstream [--limit 100] [--output r.json]
    vffn-lm-eval --workdir runs/tiny --tasks hellaswag,lambada_openai --batch-size 16

`VffnLM` is a `lm_eval.api.model.TemplateLM` over a restored run (`checkpoint.restore.restore_params`:
parameters only, sharded over the mesh of the devices present), tokenised with the run's own tokenizer.
No torch: lm-eval imports it only for its own hf/vllm backends.

* loglikelihood: lm-eval's request encoding (`TemplateLM`: context + continuation encoded whole and split,
  an empty context becomes the EOS token; the run's tokenizers add no BOS), then lm-eval's HF convention
  for length: the last `train.seq_len + 1` tokens are kept (the context is cut from the left). A
  continuation longer than seq_len keeps one context token and is scored past seq_len (the model has RoPE;
  lm-eval's hf backend would refuse it). Scores come from the inference-mode forward (`train=False`, the
  one `eval.py` uses), log-softmax in float32 over the model's whole vocabulary, as transformers computes it.
* batching: requests are grouped by length into widths (powers of two, at least 16, the longest at seq_len)
  and packed into fixed-shape `[B, width + 1]` batches (B a multiple of the data-parallel size: --batch-size,
  or as many rows as `eval.py --tasks` puts in one batch), so each width compiles once.
* loglikelihood_rolling: lm-eval's disjoint rolling windows of seq_len tokens (EOS as the first context).
* generate_until: `vffn_jax.infer.decode.generate` (KV cache), greedy unless the request asks for sampling
  (`do_sample` with a temperature, top_k, top_p); the context keeps its last `seq_len - max_gen_toks` tokens;
  decoding stops at EOS or after max_gen_toks (default 256) tokens, and the text is cut at the first of the
  request's `until` strings (decoding does not stop early at them: the cut is exact, only slower).

Multi-process runs: every process runs the same requests (lm-eval sees one rank) and feeds its own rows of
each batch; only process 0 writes --output.

Exit status: 0 done, 2 bad input (missing run or step, unknown task, bad flag; `vffn_jax.errors`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence
from unittest import mock

import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _e:  # the module is an lm-eval backend: without lm-eval there is nothing to run
    raise ModuleNotFoundError(
        f"vffn_jax.evals.lm_harness needs lm-evaluation-harness ({_e}): pip install -r requirements-hf.txt") from None

from vffn_jax.config import ConfigError

MODEL_NAME = "vffn_jax"
MIN_WIDTH = 16
DEFAULT_MAX_GEN_TOKS = 256
log = logging.getLogger(__name__)


def width_for(n_inputs: int, seq_len: int) -> int:
    """The compiled input width for a request of `n_inputs` model inputs: the next power of two (at least
    MIN_WIDTH), at most seq_len unless the request itself is longer."""
    w = max(MIN_WIDTH, 1 << max(0, n_inputs - 1).bit_length())
    return max(min(w, seq_len), n_inputs)


def fit_request(context: Sequence[int], continuation: Sequence[int], seq_len: int) -> list[int]:
    """context + continuation, cut from the left to seq_len + 1 tokens (lm-eval's HF backend); a continuation
    longer than seq_len keeps one context token instead (scored past seq_len)."""
    if not context or not continuation:
        raise ValueError("a loglikelihood request needs a context token and a continuation token")
    if len(continuation) > seq_len:
        return [context[-1], *continuation]
    return [*context, *continuation][-(seq_len + 1):]


@dataclasses.dataclass(frozen=True)
class GenSettings:
    max_gen_toks: int
    until: tuple[str, ...]
    temperature: float
    top_k: int
    top_p: float


@register_model(MODEL_NAME)
class VffnLM(TemplateLM):
    """lm-eval's model for a vffn_jax run directory (`--model vffn_jax --model_args workdir=RUN[,step=N]` once
    this module is imported; `vffn-lm-eval` does that)."""

    def __init__(self, workdir=None, step=None, batch_size=None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 seed: int = 0, overrides: dict[str, Any] | None = None, devices=None, run=None, **ignored):
        super().__init__()
        from vffn_jax.checkpoint import restore
        from vffn_jax.data.tokenizer import load_tokenizer
        from vffn_jax.evals.scoring import SHARD_TOKENS, make_score_fn

        self._batch_rows = self._parse_batch_size(batch_size)  # bad flags fail before anything is restored
        if run is None:
            if workdir is None:
                raise ConfigError("the vffn_jax model needs workdir=RUN (a training run or a params-only export)")
            run = restore.restore_params(workdir, None if step in (None, "") else int(step), devices, overrides)
        self.run = run
        self.cfg, self.setup = run.cfg, run.setup
        self.vffn_tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        self._max_gen_toks = int(max_gen_toks)
        self._seed = int(seed)
        mesh_shape = dict(zip(self.setup.mesh.axis_names, (int(x) for x in self.setup.mesh.devices.shape)))
        self.dp = mesh_shape["data"] * mesh_shape["fsdp"]
        self.token_budget = min(self.cfg.train.batch_size * self.cfg.train.seq_len, self.dp * SHARD_TOKENS)
        self._score_fn = make_score_fn(self.setup.graphdef, self.setup.mesh, self.setup.param_shardings)
        self._pure_params = None
        self.compiled_shapes: set[tuple[int, int]] = set()  # (rows, width) of the scoring batches run so far
        ignored = {k: v for k, v in ignored.items() if v is not None}
        if ignored:
            log.info("vffn_jax model: ignoring %s (the run's own devices and mesh are used)", sorted(ignored))

    @staticmethod
    def _parse_batch_size(value) -> int | None:
        if value in (None, "", "auto") or str(value).startswith("auto"):
            return None
        try:
            rows = int(value)
        except ValueError:
            raise ConfigError(f"--batch-size={value!r}: give a number of rows or 'auto'") from None
        if rows < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {rows}")
        return rows

    # ------------------------------------------------------------------ what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.vffn_tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.cfg.train.seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int | None:
        return self._batch_rows

    @property
    def tokenizer_name(self) -> str:
        return self.vffn_tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.vffn_tokenizer.encode(string))  # the run's tokenizers have no BOS to add

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.vffn_tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring

    def score_tokens(self, sequences: Sequence[Sequence[int]], cont_lens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(sums, greedy) for token sequences whose last cont_lens[i] tokens are scored, in input order."""
        from vffn_jax.evals.scoring import batch_rows_for, score_sequences

        n = len(sequences)
        sums, greedy = np.zeros(n, np.float64), np.zeros(n, bool)
        seq_len, mesh = self.max_length, self.setup.mesh
        by_width: dict[int, list[int]] = {}
        for i, s in enumerate(sequences):
            by_width.setdefault(width_for(len(s) - 1, seq_len), []).append(i)
        for width in sorted(by_width, reverse=True):
            rows = sorted(by_width[width], key=lambda i: -len(sequences[i]))
            b = batch_rows_for(len(rows), width, self.dp, self.token_budget, self._batch_rows)
            self.compiled_shapes.add((b, width))
            score_sequences(self._score_fn, self.run.params, mesh, sequences, cont_lens, rows, b, width,
                            out=(sums, greedy))
        return sums, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        seqs = [fit_request(ctx, cont, self.max_length) for _, ctx, cont in requests]
        sums, greedy = self.score_tokens(seqs, [len(cont) for _, _, cont in requests])
        out = []
        for (key, _, _), s, g in zip(requests, sums, greedy):
            answer = (float(s), bool(g))
            if key is not None:  # rolling windows have no key: cached per document by loglikelihood_rolling
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils as lm_utils

        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for ctx, pred in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(i)
        totals = np.zeros(len(requests), np.float64)
        for i, (s, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += s
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    # ------------------------------------------------------------------ generation

    def gen_settings(self, gen_kwargs: dict | None) -> GenSettings:
        """A request's generation settings: lm-eval's keys (until, max_gen_toks, do_sample, temperature,
        top_k, top_p); greedy unless do_sample is set with a temperature > 0 (or a temperature alone)."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos_text = self.tok_decode([self.eot_token_id])
        if eos_text and eos_text not in until:
            until.append(eos_text)
        max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = kw.pop("do_sample", None)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0  # transformers' default when sampling is asked for without a temperature
        top_k, top_p = int(kw.pop("top_k", 0) or 0), float(kw.pop("top_p", 1.0) or 1.0)
        if kw:
            log.warning("vffn_jax model: ignoring generation settings %s", sorted(kw))
        if max_gen >= self.max_length:
            raise ConfigError(f"max_gen_toks={max_gen} leaves no room for a prompt in the model's context of "
                              f"{self.max_length} tokens (train.seq_len)")
        return GenSettings(max_gen, tuple(u for u in until if u), temperature, top_k, top_p)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from vffn_jax.infer import sampling
        from vffn_jax.infer import text as text_lib

        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            g = self.gen_settings(gen_kwargs)
            settings.append(g)
            groups.setdefault((g.max_gen_toks, g.temperature, g.top_k, g.top_p), []).append(i)
        params = self._params_dict()
        rows = self._batch_rows or max(self.dp, 8)
        for (max_gen, temperature, top_k, top_p), idx in groups.items():
            keep = self.max_length - max_gen
            prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in idx]
            s_cfg = sampling.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
            gens, _ = text_lib.generate_in_batches(
                self.cfg.model, params, prompts, batch_size=rows, max_new_tokens=max_gen, context=self.max_length,
                sampling_cfg=s_cfg, seed=self._seed, eos_id=self.eot_token_id,
                valid_vocab=self.vffn_tokenizer.vocab_size, mesh=self.setup.mesh, seed_per_batch=False)
            for i, g in zip(idx, gens):
                ids = [t for t in g.ids if t != self.eot_token_id]
                text = self.tok_decode(ids)
                for stop in settings[i].until:
                    text = text.split(stop)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    def _params_dict(self):
        if self._pure_params is None:
            from vffn_jax.model import kv_cache

            self._pure_params = kv_cache.pure_params(self.run.params)
        return self._pure_params


# --------------------------------------------------------------------------- tasks and the command line


def task_manager(names: Sequence[str], include_paths: Sequence[str] = ()):
    """An lm-eval TaskManager that knows the vffn_* tasks (and `include_paths`); lm-eval's built-in tasks are
    indexed only when a name is not among those (indexing them takes seconds). ConfigError for unknown names."""
    from lm_eval.tasks import TaskManager

    from vffn_jax.evals.lm_eval_tasks import PREFIX, TASKS_DIR

    paths = [str(TASKS_DIR), *map(str, include_paths)]
    tm = TaskManager(include_path=paths, include_defaults=False)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing and not all(n.startswith(PREFIX) for n in missing):  # vffn_* names can only be ours
        tm = TaskManager(include_path=paths, include_defaults=True)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        ours = sorted(n for n in tm.all_tasks if n.startswith("vffn_"))
        raise ConfigError(f"unknown lm-eval task(s) {unknown}: --tasks takes lm-eval task or group names, e.g. "
                          f"{', '.join(ours)} (from {TASKS_DIR}), lm-eval's own (`lm_eval ls tasks`) or "
                          "those of --include-path")
    return tm


def _add_env_info(storage: dict[str, Any]) -> None:
    """lm-eval's `add_env_info` keys, from package metadata instead of importing torch and transformers."""
    import importlib.metadata as md

    import jax

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "N/A"

    storage.update({"pretty_env_info": f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
                                       f"({jax.device_count()} devices); torch not used",
                    "transformers_version": version("transformers"), "lm_eval_version": version("lm_eval"),
                    "upper_git_hash": None})


def evaluate(workdir, tasks: str | Sequence[str], *, step: int | None = None, include_paths: Sequence[str] = (),
             limit: int | None = None, batch_size: int | None = None, num_fewshot: int | None = None,
             max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0, overrides: dict[str, Any] | None = None,
             log_samples: bool = False, lm: VffnLM | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate with the run as the model; returns lm-eval's result dict (`results`, `groups`,
    `configs`, `n-samples`, ... and `samples` with log_samples)."""
    import lm_eval.evaluator

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise ConfigError("--tasks: give one or more lm-eval task or group names, e.g. vffn_downstream")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    tm = task_manager(names, include_paths)
    if lm is None:
        lm = VffnLM(workdir, step=step, batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed,
                    overrides=overrides)
    # torch_random_seed=None and our own environment record: lm-eval would otherwise import torch (seconds, and
    # torch's collect_env runs pip and nvidia-smi) whenever it is installed, though nothing here uses it
    with mock.patch.object(lm_eval.evaluator, "add_env_info", _add_env_info):
        result = lm_eval.evaluator.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                         task_manager=tm, log_samples=log_samples, random_seed=seed,
                                         numpy_random_seed=seed, torch_random_seed=None, fewshot_random_seed=seed)
    devices = list(lm.setup.mesh.devices.flat)
    result["vffn_jax"] = {"workdir": str(lm.run.workdir), "step": lm.run.step, "tokenizer": lm.cfg.data.tokenizer,
                          "seq_len": lm.max_length, "devices": f"{len(devices)} x {devices[0].device_kind}",
                          "notes": [n for n in lm.run.notes if not n.startswith("eval batch")]}
    return result
