"""Continuous batching (vffn_jax/serve/engine.py) on the session's params-only run: a request's greedy tokens are
`infer.decode.generate`'s (what `generate.py --temperature 0` prints) whatever else is in flight, a seeded
sample is `generate.py --seed`'s, a cancelled request frees its slot at once, and every slot comes back."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vffn_jax.infer import decode, sampling
from vffn_jax.infer import text as text_lib
from vffn_jax.serve.request import Request

DEADLINE_S = 120
EOS = 256  # the byte tokenizer's


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.done.set()

    @property
    def final(self):
        return self.events[-1]

    def text(self):
        return "".join(e.text for e in self.events)


def submit_all(engine, requests):
    cols = [Collector() for _ in requests]
    handles = [engine.submit(r, c) for r, c in zip(requests, cols)]
    return handles, cols


def wait(cols):
    deadline = time.monotonic() + DEADLINE_S
    for c in cols:
        assert c.done.wait(max(0.0, deadline - time.monotonic())), "a request did not finish in time"


def reference(served, prompts, n, cfg=sampling.SamplingConfig(0.0), seed=0):
    enc = text_lib.encode_prompts(served.tokenizer, prompts, context=served.context)
    gens, _ = decode.generate(served.m, served.params, enc, max_new_tokens=n, context=served.context,
                              sampling_cfg=cfg, seed=seed, eos_id=served.eos_id, valid_vocab=served.valid_vocab,
                              mesh=served.mesh)
    return enc, gens


def ids_of(col):
    """Generated ids as generate.py reports them: with its EOS when it stopped there (no stop strings here)."""
    f = col.final
    return f.ids + ([EOS] if f.finish_reason == "stop" else [])


@pytest.mark.parametrize("engine_name", ["engine", "bucketed_engine"])
def test_greedy_equals_generate_whatever_is_in_flight(engine_name, served, request):
    engine = request.getfixturevalue(engine_name)
    prompts = ["And God said", "In the beginning was", "x", "Let there be light, and there was " + "l" * 12]
    enc, gens = reference(served, prompts, 12)
    # other traffic first: long sampled requests occupying slots while the greedy ones come and go
    noise_h, noise = submit_all(engine, [Request(tuple(enc[i % 2]), 30, temperature=1.0, seed=i) for i in range(5)])
    _, cols = submit_all(engine, [Request(tuple(ids), 12, temperature=0.0, logprobs=1) for ids in enc])
    engine.warmup()  # runs every bucket's program on idle rows while these decode: it must not touch them
    wait(cols + noise)
    for g, col in zip(gens, cols):
        assert ids_of(col) == g.ids, (g.ids, col.final)
        assert col.text() == served.tokenizer.decode(g.ids)
        lps = [t.logprob for e in col.events for t in e.tokens]
        np.testing.assert_allclose(lps, g.logprobs[:len(lps)], atol=1e-5)
        assert col.final.finish_reason == ("stop" if g.finish_reason == "eos" else "length")
    assert engine.busy() == (0, 0)


def test_a_seeded_sample_equals_generate_with_that_seed(engine, served):
    cfg = sampling.SamplingConfig(0.8, 0, 0.95)
    enc, gens = reference(served, ["Amen"], 10, cfg, seed=7)
    _, (col,) = submit_all(engine, [Request(tuple(enc[0]), 10, temperature=0.8, top_p=0.95, seed=7)])
    wait([col])
    assert ids_of(col) == gens[0].ids


def test_prompt_filling_the_context_and_slotless_requests(engine, served):
    full = tuple([served.eos_id] + [65] * (served.context - 1))
    _, cols = submit_all(engine, [Request(full, 5, temperature=0.0), Request(full[:5], 1, temperature=0.0),
                                  Request(full[:5], 0, echo=True, logprobs=1)])
    wait(cols)
    assert cols[0].final.finish_reason == "length" and cols[0].final.completion_tokens == 1  # no room for a 2nd
    assert cols[1].final.completion_tokens == 1
    echoed = [t for e in cols[2].events for t in e.tokens]
    assert [t.id for t in echoed] == list(full[:5]) and echoed[0].logprob is None
    assert all(t.logprob < 0 for t in echoed[1:]) and cols[2].final.completion_tokens == 0


def test_cancel_frees_the_slot_at_once(engine, served):
    handles, cols = submit_all(engine, [Request((served.eos_id, 65), 40, temperature=1.0, seed=1)])
    deadline = time.monotonic() + DEADLINE_S
    while not cols[0].events and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.cancel(handles[0])
    wait(cols)
    assert cols[0].final.finish_reason == "cancelled" and cols[0].final.completion_tokens < 40
    assert engine.busy() == (0, 0)


def test_slots_round_up_to_the_data_parallel_size(engine, served):
    assert engine.slots % decode.batch_multiple(served.mesh) == 0 and engine.slots >= 8


def test_a_stop_string_inside_a_decode_call_ends_at_its_token(engine, served):
    """The engine hands out a call's tokens together; a stop string completed by one of them still ends the request
    at that token, as if it had been checked token by token: the later tokens of the call are not counted."""
    enc, (g,) = reference(served, ["And God said"], 12)
    dec, k = served.tokenizer.decode, engine.spec.steps_per_call
    full = dec(g.ids)

    def ends_at(stop):  # the token that completes the stop string's first occurrence
        return next(n for n in range(1, len(g.ids) + 1) if stop in dec(g.ids[:n]))

    # token 1 comes from the prefill, tokens 2..k+1 from the first decode call, and so on: pick a stop string
    # completed by a token that is not its call's last, so the call has later tokens to drop
    stop = next(full[i:i + 2] for i in range(len(full) - 1) if "\ufffd" not in full[i:i + 2]
                and ends_at(full[i:i + 2]) >= 2 and (ends_at(full[i:i + 2]) - 1) % k)
    n_stop = ends_at(stop)
    _, (col,) = submit_all(engine, [Request(tuple(enc[0]), 12, temperature=0.0, stop=(stop,), logprobs=0)])
    wait([col])
    f = col.final
    assert f.finish_reason == "stop" and col.text() == full[:full.index(stop)]
    assert f.completion_tokens == n_stop and f.ids == g.ids[:n_stop]
    assert [t.id for e in col.events for t in e.tokens] == g.ids[:n_stop]


def test_few_requests_compute_only_their_rows(bucketed_engine, served):
    """With few requests in flight a decode step computes the smallest bucket holding their slots (the lowest
    free slots are taken first), not every slot: the free slots' loops are charged for 8 rows, not 16."""
    engine = bucketed_engine
    assert engine.layout.data_parallel * engine.layout.buckets[0] == 8 and engine.slots == 16
    before = engine.metrics.snapshot()
    _, cols = submit_all(engine, [Request((served.eos_id, 65), 6, temperature=0.0)] * 3)
    wait(cols)
    after = engine.metrics.snapshot()
    d = {k: after[k] - before[k] for k in ("decode_steps", "loops_free_slots", "token_layers")}
    assert d["decode_steps"] > 0  # each step charges its in-use rows' layers and its free rows' single loops
    assert d["loops_free_slots"] + d["token_layers"] == d["decode_steps"] * 8 * served.m.n_layers
