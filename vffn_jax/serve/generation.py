"""One request being generated (the engine thread's): the tokens the device samples for it become its events.

The engine batches; a `Generation` knows its own request. It keeps the request's text (`textout.TextState`),
its count and depth, and decides where the request ends: at EOS (unless ignored), at `max_tokens`, at the
context's end, or at a stop string, which may fall inside a decode call's tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from vffn_jax.serve import textout
from vffn_jax.serve.request import Event, Handle


@dataclasses.dataclass
class Generation:
    handle: Handle
    decode: Callable[[list[int]], str]  # the tokenizer's ids -> text
    eos_id: int
    context: int
    n_layers: int
    generated: int = 0
    depth_sum: float = 0.0  # the generated tokens' depth, summed over layers

    def __post_init__(self):
        self.text = textout.TextState(self.decode, self.handle.request.stop)

    def echo_tokens(self, logprob_t, top_ids_tn, top_lps_tn) -> list[textout.TokenInfo]:
        """The prompt's tokens as an echo reports them (the first has nothing before it to predict it)."""
        r, dec = self.handle.request, self.decode
        out = []
        for j, tid in enumerate(int(t) for t in r.prompt_ids):
            top = None if j == 0 or r.logprobs is None else textout.top_dict(dec, top_ids_tn[j], top_lps_tn[j],
                                                                              r.logprobs)
            out.append(textout.TokenInfo(tid, dec([tid]), None if j == 0 else float(logprob_t[j]), top))
        return out

    def take(self, toks, lps, top_ids, top_lps, depth_n, *, has_slot: bool = True, prefix_text: str = "",
             prefix_tokens: list | None = None) -> tuple[Event | None, str | None, int]:
        """The tokens one device call sampled for this request (`toks [n]` in order, their log-probabilities, top
        log-probabilities `[n, TOP_N]` and depths summed over layers `[n]`): (the event to send now or None, the
        finish reason or None, the tokens counted). The device stops a row at EOS, its budget or the context's
        end, so only the last token can end the request there; a stop string can end it earlier, and the tokens
        after the one that completes it are dropped. A request without a slot ends at its first token."""
        r, eos = self.handle.request, self.eos_id
        toks = [int(t) for t in toks]
        if r.stop:  # a stop string can fall inside the call: text token by token, stop where it ends
            n = 0
            for n, tok in enumerate(toks, 1):
                if r.stop_at_eos and tok == eos:
                    break
                self.text.add(tok)
                if self.text.stopped:
                    break
            toks = toks[:n]
        else:
            self.text.extend(toks[:-1] if r.stop_at_eos and toks[-1] == eos else toks)
        n = len(toks)
        self.generated += n
        self.depth_sum += float(np.sum(depth_n[:n]))
        ended_eos = r.stop_at_eos and toks[-1] == eos
        tokens = list(prefix_tokens or [])
        if r.logprobs is not None:  # token records only where the answer reports them
            for j, tok in enumerate(toks[:n - 1] if ended_eos else toks):
                tokens.append(textout.TokenInfo(tok, self.decode([tok]), float(lps[j]),
                                                textout.top_dict(self.decode, top_ids[j], top_lps[j], r.logprobs)))
        reason = None
        if ended_eos or self.text.stopped:
            reason = "stop"
        elif self.generated >= r.max_tokens or len(r.prompt_ids) + self.generated - 1 >= self.context \
                or not has_slot:
            reason = "length"
        if reason is None:
            return Event(prefix_text + self.text.delta(final=False), tokens, n), None, n
        return (Event(prefix_text, tokens, n) if prefix_text or tokens else None), reason, n

    def final(self, reason: str, error: str | None = None) -> Event:
        """The last event: the rest of the text and the totals."""
        t = self.text
        return Event(t.delta(final=True), finish_reason=reason, prompt_tokens=len(self.handle.request.prompt_ids),
                     completion_tokens=self.generated, kept_tokens=t.kept_tokens(), ids=list(t.ids),
                     mean_depth=self.depth_sum / max(self.generated, 1) / self.n_layers, error=error)
