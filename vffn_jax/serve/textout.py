"""One request's generated text, token by token: stop strings, held-back text, and OpenAI logprob records.

Text is always the decoding of every generated token so far (a UTF-8 character may span tokens: decoding pieces
separately would garble it). A streamed delta holds back (a) a trailing replacement character, which may be half
a character whose next byte has not come yet, and (b) the longest tail that could still grow into a stop string,
so that no client ever sees the start of a stop string the final text does not contain.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

REPLACEMENT = "\ufffd"


def stop_cut(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """The index where the earliest stop string begins in `text` (searching from `start`), or None."""
    hits = [i for i in (text.find(s, max(0, start)) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters must wait: a partial character, or a tail that begins a stop string."""
    n = 0
    while n < len(text) and text[len(text) - 1 - n] == REPLACEMENT and n < 3:
        n += 1
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


@dataclasses.dataclass
class TokenInfo:
    """One token as the logprobs object reports it."""

    id: int
    text: str
    logprob: float | None  # None for an echoed prompt's first token (nothing before it to predict it)
    top: dict[str, float] | None


@dataclasses.dataclass
class TextState:
    """Generated text of one request (the engine thread owns it)."""

    decode: object  # ids -> str
    stops: tuple[str, ...]
    ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    stopped: bool = False  # a stop string ended the text (it and what follows are cut)

    def extend(self, token_ids) -> None:
        """Several tokens at once, decoding once (for a request without stop strings: with them, `add` each so the
        text stops at the token that completes one)."""
        if self.stops:
            raise ValueError("extend() is for requests without stop strings; add() each token")
        if len(token_ids):
            self.ids.extend(int(t) for t in token_ids)
            self.text = self.decode(self.ids)

    def add(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self.decode(self.ids)
        longest = max((len(s) for s in self.stops), default=0)
        cut = stop_cut(text, self.stops, start=len(self.text) - longest) if self.stops else None
        if cut is not None:
            text, self.stopped = text[:cut], True
        self.text = text

    def delta(self, final: bool) -> str:
        """The text not yet sent that is safe to send now (everything left, when `final`)."""
        end = len(self.text) if final or self.stopped else len(self.text) - held_back(self.text, self.stops)
        end = max(end, self.emitted)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def kept_tokens(self) -> int:
        """How many generated tokens the final text covers (a stop string cuts the ones after it)."""
        if not self.stopped:
            return len(self.ids)
        for n in range(1, len(self.ids) + 1):
            if len(self.decode(self.ids[:n])) >= len(self.text):
                return n
        return len(self.ids)


def top_dict(decode, ids: Sequence[int], lps: Sequence[float], n: int) -> dict[str, float]:
    """OpenAI's `top_logprobs` entry: token text -> log-probability for the n most likely (first text wins)."""
    out: dict[str, float] = {}
    for i, lp in zip(list(ids)[:n], list(lps)[:n]):
        out.setdefault(decode([int(i)]), float(lp))
    return out


def logprobs_object(tokens: Sequence[TokenInfo], start_offset: int = 0) -> dict:
    """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs and text_offset (the character
    offset of each token in the returned text, from the concatenated token texts)."""
    offsets, pos = [], start_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top for t in tokens], "text_offset": offsets}
