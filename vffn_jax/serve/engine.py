"""Continuous batching: a fixed number of decode slots over one persistent KV cache, driven by one thread.

Each turn of the engine thread
  1. drops cancelled requests (queued ones, and those in a slot: the slot is free at once);
  2. prefills queued requests (one group of up to `prefill_rows` prompts of one length bucket while others
     decode; as many groups as fit while nothing decodes) into free slots — a request that needs no decode
     step (max_tokens <= 1, or a prompt that fills the context) takes no slot;
  3. runs K decode steps in one device call over the smallest bucket of slots holding those in use
     (`programs.decode_bucket`, `programs.SlotLayout`: each step the model's one forward pass, free slots
     inactive rows of the depth compaction; new requests take the lowest free places, so few requests mean few
     rows) and hands each in-use slot's tokens of the call to its request as one event (one detokenisation,
     one HTTP chunk: per-token Python was the server's largest cost).

A request's tokens depend on its own prompt, settings and seed only: every row of a prefill or decode step is
computed independently (per-row positions, per-row keys), so its greedy output is `generate.py --temperature 0`'s
for the same prompt whatever else is in flight. Requests receive `Event`s through their `sink` (called on the
engine thread; the HTTP side forwards them to its event loop). JAX releases the GIL while a program runs, so
the HTTP loop keeps answering.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import traceback
from typing import Callable

import numpy as np

from vffn_jax.infer import decode as decode_lib
from vffn_jax.serve import programs as programs_lib
from vffn_jax.serve.generation import Generation
from vffn_jax.serve.metrics import Metrics
from vffn_jax.serve.request import Event, Handle, Request
from vffn_jax.serve.served import Served

log = logging.getLogger(__name__)
SEED_MOD = 2 ** 31  # seeds are int32 on the device


class EngineClosed(RuntimeError):
    """The engine no longer admits requests (draining or stopped)."""


def needs_slot(r: Request, context: int) -> bool:
    """Whether a request decodes past its first token (which prefill samples)."""
    return r.max_tokens >= 2 and len(r.prompt_ids) < context


class Engine:
    def __init__(self, served: Served, slots: int = 8, *, steps_per_call: int = 8, prefill_rows: int | None = None,
                 clock=time.monotonic):
        dp = decode_lib.batch_multiple(served.mesh)
        slots = -(-max(1, slots) // dp) * dp
        # up to 8 prompts per prefill call (padded to the data-parallel size): a burst of requests fills the slots
        # in a few calls instead of one call (and one decode step) per request
        rows = -(-max(1, prefill_rows or min(slots, 8)) // dp) * dp
        self.served, self.clock = served, clock
        self.spec = programs_lib.ProgramSpec(slots, rows, served.context, served.valid_vocab, served.eos_id,
                                             max(1, steps_per_call), dp)
        self.programs = programs_lib.Programs(served.m, self.spec, served.mesh)
        self.layout = self.spec.layout
        self.metrics = Metrics(slots, clock)
        self.n_layers = served.m.n_layers
        self._cache = self.programs.empty_cache(served.params)
        self._live: list[Generation | None] = [None] * slots
        z = lambda dt: np.zeros((slots,), dt)  # noqa: E731
        self._st = {"tok": z(np.int32), "pos": np.full((slots,), served.context, np.int32), "seg": z(np.int32),
                    "active": z(bool), "temperature": z(np.float32), "top_k": z(np.int32),
                    "top_p": np.ones((slots,), np.float32), "seed": z(np.int32), "t": z(np.int32),
                    "budget": z(np.int32), "stop_eos": z(bool)}
        self._queue: collections.deque[Handle] = collections.deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._admitting = True
        self._stopping = False
        self._compile_all = False  # warmup() asks the engine thread to compile every bucket of slots
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the HTTP side's calls (any thread)

    @property
    def slots(self) -> int:
        return self.spec.slots

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="vffn-serve-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request, sink: Callable[[Event], None]) -> Handle:
        n = len(request.prompt_ids)
        if not 1 <= n <= self.served.context:
            raise ValueError(f"a prompt holds 1..{self.served.context} tokens, not {n}")
        with self._cv:
            if not self._admitting:
                raise EngineClosed("the server is shutting down")
            h = Handle(next(self._ids), request, sink, self.clock())
            self._queue.append(h)
            self._cv.notify_all()
        return h

    def cancel(self, h: Handle) -> None:
        with self._cv:
            if not h.done:
                h.cancelled = True
                self._cv.notify_all()

    def busy(self) -> tuple[int, int]:
        """(queued requests, slots in use)."""
        with self._cv:
            return len(self._queue), sum(x is not None for x in self._live)

    def stop_admitting(self) -> None:
        with self._cv:
            self._admitting = False

    def drain(self, seconds: float) -> bool:
        """Stops admitting, waits up to `seconds` for in-flight requests, cancels what is left and stops the
        thread; True when everything finished on its own."""
        self.stop_admitting()
        deadline = self.clock() + seconds
        clean = True
        while self.busy() != (0, 0):
            if self.clock() >= deadline:
                clean = False
                with self._cv:
                    for h in list(self._queue) + [x.handle for x in self._live if x is not None]:
                        h.cancelled = True
                    self._cv.notify_all()
                break
            time.sleep(0.02)
        self.close(timeout=max(5.0, seconds))
        return clean

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._admitting = False
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def warmup(self) -> None:
        """Compiles the decode step of every bucket of slots and the shortest prefill bucket now, not when the
        traffic first needs them (a compile stalls every slot)."""
        with self._cv:
            self._compile_all = True
        done = threading.Event()
        h = self.submit(Request((self.served.eos_id,), max_tokens=2, temperature=0.0),
                        lambda ev: done.set() if ev.finish_reason else None)
        if self._thread is None:
            raise RuntimeError("start() the engine before warmup()")
        done.wait(600)
        del h

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._queue and not any(self._live):
                    self._cv.wait(0.5)
                if self._stopping and not self._queue and not any(self._live):
                    break
                stopping = self._stopping
            try:
                if stopping:  # close() without drain(): nothing more runs
                    self._cancel_all("cancelled")
                    break
                if self._compile_all:
                    self._compile_all = False
                    self._compile_decode_buckets()
                self._drop_cancelled()
                decoding = any(x is not None for x in self._live)
                while self._admit_group():
                    if decoding:
                        break  # one group per decode step: the others keep decoding
                if any(x is not None for x in self._live):
                    self._decode_step()
            except Exception:  # a bug must not take the server down: fail what was in flight, start afresh
                log.error("serve engine step failed:\n%s", traceback.format_exc())
                self._cancel_all("error", "internal error in the decode engine; see the server log")
                self._cache = self.programs.empty_cache(self.served.params)
            self._publish_gauges()
        self._publish_gauges()

    def _publish_gauges(self) -> None:
        q, used = self.busy()
        self.metrics.gauges(q, used)

    def _emit(self, h: Handle, ev: Event) -> None:
        if ev.finish_reason is not None:
            h.done = True
            self.metrics.request_done(ev.finish_reason)
        try:
            h.sink(ev)
        except Exception:  # a sink that fails (its client went away) must not stop the others
            log.debug("sink of request %d failed", h.id, exc_info=True)

    def _free(self, slot: int) -> None:
        self._live[slot] = None
        self._st["active"][slot] = False
        self._st["pos"][slot] = self.served.context  # out of range: an idle row writes nothing to the cache

    def _finish(self, slot: int | None, live: Generation, reason: str, error: str | None = None) -> None:
        if slot is not None:
            self._free(slot)
        self._emit(live.handle, live.final(reason, error))

    def _cancel_all(self, reason: str, error: str | None = None) -> None:
        with self._cv:
            queued = list(self._queue)
            self._queue.clear()
        for h in queued:
            if not h.done:
                self._emit(h, Event(finish_reason=reason, prompt_tokens=len(h.request.prompt_ids), error=error))
        for slot, live in enumerate(self._live):
            if live is not None:
                self._finish(slot, live, reason, error)

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [h for h in self._queue if h.cancelled]
            for h in gone:
                self._queue.remove(h)
        for h in gone:
            self._emit(h, Event(finish_reason="cancelled", prompt_tokens=len(h.request.prompt_ids)))
        for slot, live in enumerate(self._live):
            if live is not None and live.handle.cancelled:
                self._finish(slot, live, "cancelled")

    def _admit_group(self) -> bool:
        """Prefills one group of queued requests (same length bucket and echo) into free slots; False when
        nothing could be admitted."""
        ctx = self.served.context
        free = self.layout.fill_order([i for i, x in enumerate(self._live) if x is None])
        group: list[Handle] = []
        with self._cv:
            key = None
            for h in list(self._queue):
                if h.cancelled:  # left for the next turn's `_drop_cancelled`
                    continue
                r = h.request
                k = (decode_lib.bucket(len(r.prompt_ids), ctx), r.echo)
                if key is not None and k != key:
                    continue
                if needs_slot(r, ctx) and len(free) <= sum(needs_slot(g.request, ctx) for g in group):
                    continue
                key = k
                group.append(h)
                self._queue.remove(h)
                if len(group) == self.spec.prefill_rows:
                    break
        if not group:
            return False
        self._prefill(group, key[0], key[1], free)
        return True

    def _prefill(self, group: list[Handle], t_pad: int, echo: bool, free: list[int]) -> None:
        spec, ctx = self.spec, self.served.context
        r_rows = spec.prefill_rows
        tokens = np.zeros((r_rows, t_pad), np.int32)
        lengths = np.zeros((r_rows,), np.int32)
        slot_r = np.full((r_rows,), spec.slots, np.int32)  # out of range: writes nothing
        samp = {"temperature": np.zeros((r_rows,), np.float32), "top_k": np.zeros((r_rows,), np.int32),
                "top_p": np.ones((r_rows,), np.float32), "seed": np.zeros((r_rows,), np.int32),
                "t": np.zeros((r_rows,), np.int32)}
        free = list(free)
        for i, h in enumerate(group):
            r = h.request
            tokens[i, :len(r.prompt_ids)] = r.prompt_ids
            lengths[i] = len(r.prompt_ids)
            if needs_slot(r, ctx):
                slot_r[i] = free.pop(0)
            samp["temperature"][i], samp["top_k"][i], samp["top_p"][i] = r.temperature, r.top_k, r.top_p
            samp["seed"][i] = r.seed % SEED_MOD
        self._cache, out = self.programs.prefill(t_pad, echo)(self.served.params, self._cache, tokens, lengths,
                                                              slot_r, samp)
        out = {k: np.asarray(v) for k, v in out.items()}
        self.metrics.prefill()
        for i, h in enumerate(group):
            r = h.request
            n = len(r.prompt_ids)
            self.metrics.tokens(0, prompt=n)
            live = Generation(h, self.served.tokenizer.decode, self.served.eos_id, self.served.context, self.n_layers)
            echoed = live.echo_tokens(out["prompt_logprob"][i], out["prompt_top_ids"][i],
                                      out["prompt_top_lps"][i]) if echo else []
            echo_text = self.served.tokenizer.decode(list(r.prompt_ids)) if echo else ""
            if r.max_tokens == 0:
                self._emit(h, Event(echo_text, echoed))
                self._finish(None, live, "length")
                continue
            slot = int(slot_r[i]) if slot_r[i] < spec.slots else None
            if slot is not None:
                self._live[slot] = live
                st = self._st
                st["pos"][slot], st["seg"][slot], st["active"][slot] = n, out["next_seg"][i], True
                st["temperature"][slot], st["top_k"][slot], st["top_p"][slot] = r.temperature, r.top_k, r.top_p
                st["seed"][slot], st["t"][slot] = r.seed % SEED_MOD, 1  # the next token's index
                st["budget"][slot], st["stop_eos"][slot] = r.max_tokens, r.stop_at_eos
                st["tok"][slot] = out["tok"][i]
            self._deliver(slot, live, live.take(
                out["tok"][i:i + 1], out["logprob"][i:i + 1], out["top_ids"][i:i + 1], out["top_lps"][i:i + 1],
                out["depth"][i:i + 1].sum(axis=-1), has_slot=slot is not None, prefix_text=echo_text,
                prefix_tokens=echoed))

    def _deliver(self, slot: int | None, live: Generation, taken: tuple[Event | None, str | None, int]) -> None:
        """Sends what `Generation.take` made of a call's tokens for one request, and ends it where they end it."""
        ev, reason, n = taken
        self.metrics.tokens(n)
        if ev is not None:
            self._emit(live.handle, ev)
        if reason is not None:
            self._finish(slot, live, reason)

    def _compile_decode_buckets(self) -> None:
        """Runs every bucket's decode program once on idle rows (inactive, positioned past the cache: they write
        nothing), so none compiles under load; the host state and the requests in flight are untouched."""
        for q in self.layout.buckets:
            idle = {k: v[self.layout.members(q)] for k, v in self._st.items()}
            idle["active"][:], idle["pos"][:] = False, self.served.context
            self._cache, _, out = self.programs.step(self.served.params, self._cache, idle, q)
            np.asarray(out["tok"])

    def _decode_step(self) -> None:
        """K decode steps on the device, then each in-use slot's tokens of the call as one event (a request the
        host ends early — a stop string — ignores the rest of its tokens)."""
        st = self._st
        in_use = np.array([i for i, x in enumerate(self._live) if x is not None])
        q = self.layout.bucket_for(in_use)  # the smallest bucket of slots holding every one in use
        at = self.layout.row_of(q, in_use)  # their rows in the call's arrays
        self._cache, new_st, out = self.programs.step(self.served.params, self._cache,
                                                      {k: v[self.layout.members(q)] for k, v in st.items()}, q)
        out = {k: np.asarray(v) for k, v in out.items()}
        for k, v in new_st.items():
            if k in ("tok", "pos", "seg", "t"):
                st[k][in_use] = np.asarray(v)[at]
        rows = self.layout.data_parallel * q
        active_kb = out["active"]
        depth_kb = out["depth"].sum(axis=-1)  # [K, rows]: each row's depth summed over layers
        for j in range(self.spec.steps_per_call):
            rows_j = np.flatnonzero(active_kb[j])
            if not rows_j.size:
                break
            self.metrics.step(out["loops"][j], float(depth_kb[j, rows_j].sum()), len(rows_j), self.n_layers, rows)
        taken_b = active_kb.sum(axis=0)  # a row stays inactive once it stops: its tokens are steps 0..n-1
        for slot, r in zip(in_use.tolist(), at.tolist()):
            n = int(taken_b[r])
            if n:
                live = self._live[slot]
                self._deliver(slot, live, live.take(out["tok"][:n, r], out["logprob"][:n, r], out["top_ids"][:n, r],
                                                    out["top_lps"][:n, r], depth_kb[:n, r]))
