"""What the engine is asked for and what it answers, apart from how it batches (`serve.engine`): a `Request`
(prompt ids and sampling settings), the `Event`s it sends back, and the `Handle` the HTTP side keeps to cancel
it. The HTTP protocol builds requests from these types without importing the engine."""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top log-probabilities per token (0..5); None: no logprobs object
    echo: bool = False
    stop_at_eos: bool = True


@dataclasses.dataclass
class Event:
    """Part of a request's output. `text` is the new text; `tokens` the new tokens (the echoed prompt first);
    the last event has `finish_reason` ("stop", "length", "cancelled" or "error") and the totals."""

    text: str = ""
    tokens: list = dataclasses.field(default_factory=list)  # [textout.TokenInfo], where the request asks logprobs
    generated: int = 0  # tokens generated since the last event (its text may still be held back)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kept_tokens: int = 0  # generated tokens the final text covers (a stop string cuts later ones)
    ids: list = dataclasses.field(default_factory=list)  # every generated token id (EOS not included)
    mean_depth: float = 0.0  # the generated tokens' mean depth over layers
    error: str | None = None


@dataclasses.dataclass
class Handle:
    """One submitted request (what the HTTP side holds to cancel it)."""

    id: int
    request: Request
    sink: Callable[[Event], None]
    submitted: float
    cancelled: bool = False
    done: bool = False
