"""The OpenAI wire format: request bodies checked and turned into engine requests, responses and stream chunks
built, and errors as `{"error": {"message", "type", "param", "code"}}` with the HTTP status that fits.

Prompts: a string is encoded with the run's tokenizer after the EOS token (a document start, as `generate.py`
does), so a completion continues it exactly as `generate.py --prompt` would; a list of token ids is used as given
(no EOS added: lm-eval's `local-completions` sends context + continuation ids and reads their log-probabilities
back by position). A list of strings or of id lists is several prompts, one choice each.
"""
from __future__ import annotations

import dataclasses
import math
import secrets
import time
import uuid
from typing import Any

from vffn_jax.serve.request import Request
from vffn_jax.serve.programs import TOP_N

MAX_STOPS = 16
MAX_PROMPTS = 256


class ApiError(Exception):
    """An error answered as OpenAI does: `status`, and a JSON body naming the offending field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error",
                             500: "server_error", 503: "server_error"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Call:
    """One HTTP request's work: a Request per prompt, and how to answer."""

    kind: str  # "completion" | "chat"
    requests: list[Request]
    stream: bool
    include_usage: bool
    model: str


# --------------------------------------------------------------------------- field checks


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer, got {v!r}", name, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(400, f"'{name}' must be {rng}, got {v}", name, "invalid_value")
    return v


def _float(body: dict, name: str, default: float, ok, rule: str) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise ApiError(400, f"'{name}' must be {rule}, got {v!r}", name, "invalid_value")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {v!r}", name, "invalid_type")
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' holds at most {MAX_STOPS} strings, got {len(stops)}", "stop", "invalid_value")
    return tuple(s for s in stops if s)


def check_model(body: dict, served) -> str:
    model = body.get("model")
    if model is None:
        return served.model_id
    if model != served.model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{served.model_id}' "
                       "(GET /v1/models)", "model", "model_not_found")
    return model


def _check_unsupported(body: dict) -> None:
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"'n' must be 1 (one completion per prompt), got {body.get('n')!r}", "n", "unsupported")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, f"'best_of' must be 1, got {body.get('best_of')!r}", "best_of", "unsupported")
    for name in ("suffix", "logit_bias", "tools", "functions", "response_format"):
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported")


def encode_prompts(prompt: Any, served) -> list[tuple[int, ...]]:
    """Token ids of each prompt (see the module docstring); 400 naming `prompt` when it is malformed, empty,
    out of the vocabulary or longer than the context."""
    tok, ctx = served.tokenizer, served.context

    def ids_of(p) -> tuple[int, ...]:
        if isinstance(p, str):
            return (tok.eos_id, *tok.encode(p))
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            bad = [t for t in p if not 0 <= t < served.valid_vocab]
            if bad:
                raise ApiError(400, f"'prompt' token id {bad[0]} is outside the vocabulary "
                               f"(0..{served.valid_vocab - 1})", "prompt", "invalid_value")
            return tuple(p)
        raise ApiError(400, "'prompt' must be a string, a non-empty list of token ids, or a list of those",
                       "prompt", "invalid_type")

    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        prompts = [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds at most {MAX_PROMPTS} prompts, got {len(prompts)}", "prompt")
    out = [ids_of(p) for p in prompts]
    for i, ids in enumerate(out):
        if len(ids) > ctx:
            which = "" if len(out) == 1 else f" {i}"
            raise ApiError(400, f"'prompt'{which} is {len(ids)} tokens long, more than this model's context of "
                           f"{ctx} tokens; shorten it", "prompt", "context_length_exceeded")
    return out


def _sampling(body: dict, default_max_tokens: int) -> dict:
    top_k = _int(body, "top_k", 0, lo=-1)
    seed = _int(body, "seed", None)
    return {"max_tokens": _int(body, "max_tokens", default_max_tokens, lo=0),
            "temperature": _float(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
            "top_p": _float(body, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]"),
            "top_k": max(top_k, 0),  # -1 (vLLM's "off") = 0
            "seed": secrets.randbelow(2 ** 31) if seed is None else seed,
            "stop": _stops(body), "stop_at_eos": not _bool(body, "ignore_eos")}


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    return stream, bool(opts.get("include_usage", False))


def _common(body: Any, served, default_max_tokens: int) -> tuple[str, dict]:
    """What completions and chat check alike: a JSON object, the model, no unsupported field; (model, sampling)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    model = check_model(body, served)
    _check_unsupported(body)
    return model, _sampling(body, default_max_tokens)


def parse_completion(body: Any, served, default_max_tokens: int) -> Call:
    model, settings = _common(body, served, default_max_tokens)
    logprobs = _int(body, "logprobs", None, lo=0, hi=TOP_N)
    echo = _bool(body, "echo")
    stream, usage = _stream(body)
    reqs = [Request(ids, logprobs=logprobs, echo=echo, **settings) for ids in encode_prompts(body.get("prompt"), served)]
    return Call("completion", reqs, stream, usage, model)


def render_chat(messages: Any, served) -> tuple[int, ...]:
    """The chat template applied to `messages` (400 when the tokenizer has none, or the messages are malformed)."""
    if served.chat_template is None:
        raise ApiError(400, f"'{served.model_id}' has no chat template (its tokenizer brings none); use "
                       "POST /v1/completions with a prompt instead", "messages", "no_chat_template")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects "
                       "with string content", "messages", "invalid_type")
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(served.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token="",
            eos_token=served.tokenizer.decode([served.eos_id]))
    except jinja2.TemplateError as e:
        raise ApiError(400, f"the chat template failed on these messages: {e}", "messages") from None
    ids = tuple(served.tokenizer.encode(text))
    if not ids or len(ids) > served.context:
        raise ApiError(400, f"the chat is {len(ids)} tokens long; this model's context holds 1..{served.context}",
                       "messages", "context_length_exceeded")
    return ids


def parse_chat(body: Any, served, default_max_tokens: int) -> Call:
    model, settings = _common(body, served, default_max_tokens)
    if body.get("max_completion_tokens") is not None:
        settings["max_tokens"] = _int(body, "max_completion_tokens", default_max_tokens, lo=0)
    stream, usage = _stream(body)
    return Call("chat", [Request(render_chat(body.get("messages"), served), **settings)], stream, usage, model)


# --------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice(kind: str, index: int, text: str, finish: str | None, logprobs: dict | None, extra: dict | None = None,
           delta: bool = False, first: bool = False) -> dict:
    if kind == "chat":
        body = {"role": "assistant", "content": text} if not delta or first else {"content": text}
        out = {"index": index, ("delta" if delta else "message"): body, "logprobs": None, "finish_reason": finish}
    else:
        out = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if extra:
        out.update(extra)
    return out


def envelope(kind: str, rid: str, model: str, choices: list, use: dict | None, chunk: bool, created: int | None = None):
    obj = {"completion": "text_completion", "chat": "chat.completion"}[kind]
    if chunk and kind == "chat":
        obj += ".chunk"
    out = {"id": rid, "object": obj, "created": created or int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        out["usage"] = use
    return out
