"""One request's tokens into its events (vffn_jax/serve/generation.py), without a device: where a request ends
(EOS, max_tokens, the context, a stop string inside a call's tokens, no slot) and what it reports."""
from __future__ import annotations

import numpy as np

from vffn_jax.data.tokenizer import ByteTokenizer
from vffn_jax.serve.generation import Generation
from vffn_jax.serve.request import Handle, Request

TOK = ByteTokenizer()
EOS = 256
CONTEXT = 32


def gen(**kw) -> Generation:
    r = Request(tuple(b"Hi"), **{"max_tokens": 10, **kw})
    return Generation(Handle(1, r, lambda ev: None, 0.0), TOK.decode, EOS, CONTEXT, n_layers=2)


def take(g, ids, **kw):
    n = len(ids)
    return g.take(np.array(ids), -np.ones(n), np.zeros((n, 5), int), np.zeros((n, 5)), np.full(n, 3.0), **kw)


def test_tokens_of_a_call_are_one_event_and_eos_ends_it():
    g = gen()
    ev, reason, n = take(g, list(b"abc"))
    assert (ev.text, ev.generated, reason, n) == ("abc", 3, None, 3) and ev.tokens == []  # no logprobs asked
    ev, reason, n = take(g, [ord("d"), EOS])
    assert reason == "stop" and n == 2 and ev is None  # the text comes with the last event
    last = g.final(reason)
    assert last.text == "d" and last.completion_tokens == 5 and last.ids == list(b"abcd")
    assert last.mean_depth == 3.0 / 2  # depth summed over 2 layers, per token and layer


def test_a_stop_string_inside_a_call_drops_the_later_tokens():
    g = gen(stop=("cd",), logprobs=0)
    ev, reason, n = take(g, list(b"abcdef"))
    assert reason == "stop" and n == 4 and g.generated == 4
    assert [t.id for t in ev.tokens] == list(b"abcd")  # records of every counted token, as token-by-token
    last = g.final(reason)
    assert ev.text + last.text == "ab" and last.kept_tokens == 2 and last.completion_tokens == 4


def test_max_tokens_the_context_and_no_slot_end_with_length():
    assert take(gen(max_tokens=3), list(b"abc"))[1] == "length"
    long_prompt = Request(tuple(b"x" * (CONTEXT - 2)), max_tokens=10)
    g = Generation(Handle(2, long_prompt, lambda ev: None, 0.0), TOK.decode, EOS, CONTEXT, 2)
    assert take(g, list(b"ab"))[1] is None and take(g, list(b"c"))[1] == "length"  # its next token has no room
    ev, reason, _ = take(gen(), [ord("a")], has_slot=False, prefix_text="Hi")
    assert reason == "length" and ev.text == "Hi"


def test_ignoring_eos_keeps_it_as_text():
    g = gen(stop_at_eos=False)
    ev, reason, n = take(g, [ord("a"), EOS, ord("b")])
    assert reason is None and n == 3 and g.text.ids == [ord("a"), EOS, ord("b")]
