"""What /metrics reports, in Prometheus' text format: requests by outcome, tokens, tokens/s over the last
`WINDOW_S` seconds, queue depth, slots in use, and the FFN work of the decode steps.

FFN loops: in a decode step each layer reports the loops it executed per row (`kv_cache.decode_step`'s `loops`,
float) over the rows the step computed (the bucket of slots holding those in use: `programs.SlotLayout`), free
ones included (a free slot is an inactive row: one loop, never extended).
`vffn_ffn_loops_executed_total` counts loop-rows summed over layers (`loops * rows`), and
`vffn_ffn_token_depth_total` the in-use rows' own depth summed over layers. Per token and layer (divided by
`vffn_ffn_token_layers_total`): `vffn_ffn_executed_loops_per_token` is the in-use rows' executed loops (the
compaction's padding rows included, the free slots' single loop not), `..._all_slots` charges the free slots'
loop to the tokens too, and `vffn_ffn_mean_token_depth` is what the tokens needed (the ideal).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time

WINDOW_S = 10.0


@dataclasses.dataclass
class Counters:
    requests: dict = dataclasses.field(default_factory=lambda: collections.Counter())  # outcome -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    prefill_calls: int = 0
    loops_executed: float = 0.0  # loop-rows over layers, all slots
    loops_free_slots: float = 0.0  # of which the free slots' single loop
    token_depth: float = 0.0  # in-use rows' own depth over layers
    token_layers: int = 0  # in-use rows x layers


class Metrics:
    """Thread-safe counters the engine updates and /metrics renders."""

    def __init__(self, slots: int, clock=time.monotonic):
        self.slots, self.clock = slots, clock
        self.c = Counters()
        self.queue_depth = 0
        self.slots_in_use = 0
        self.started = clock()
        self._recent: collections.deque = collections.deque()  # (time, tokens)
        self._lock = threading.Lock()

    def request_done(self, outcome: str) -> None:
        with self._lock:
            self.c.requests[outcome] += 1

    def tokens(self, n: int, prompt: int = 0) -> None:
        with self._lock:
            self.c.completion_tokens += n
            self.c.prompt_tokens += prompt
            if n:
                self._recent.append((self.clock(), n))

    def step(self, loops_per_layer, depth_sum: float, in_use: int, n_layers: int, rows: int | None = None) -> None:
        """One decode step over `rows` slots (default all): per-layer executed loops per row, the in-use rows' depth
        summed over layers."""
        rows = self.slots if rows is None else rows
        executed = float(sum(loops_per_layer)) * rows
        with self._lock:
            self.c.decode_steps += 1
            self.c.loops_executed += executed
            self.c.loops_free_slots += float((rows - in_use) * n_layers)
            self.c.token_depth += depth_sum
            self.c.token_layers += in_use * n_layers

    def prefill(self) -> None:
        with self._lock:
            self.c.prefill_calls += 1

    def gauges(self, queue_depth: int, slots_in_use: int) -> None:
        with self._lock:
            self.queue_depth, self.slots_in_use = queue_depth, slots_in_use

    def tokens_per_s(self) -> float:
        now = self.clock()
        with self._lock:
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            n = sum(k for _, k in self._recent)
        return n / min(WINDOW_S, max(now - self.started, 1e-9))

    def snapshot(self) -> dict:
        with self._lock:
            c = dataclasses.replace(self.c, requests=dict(self.c.requests))
            queue, in_use = self.queue_depth, self.slots_in_use
        per = max(c.token_layers, 1)
        return {"requests": c.requests, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "decode_steps": c.decode_steps, "prefill_calls": c.prefill_calls, "queue_depth": queue,
                "slots": self.slots, "slots_in_use": in_use, "tokens_per_s": self.tokens_per_s(),
                "loops_executed": c.loops_executed, "loops_free_slots": c.loops_free_slots,
                "token_depth": c.token_depth, "token_layers": c.token_layers,
                "executed_loops_per_token": c.loops_executed / per,
                "executed_loops_per_token_in_use": (c.loops_executed - c.loops_free_slots) / per,
                "mean_token_depth": c.token_depth / per}


def prometheus(s: dict, model_id: str) -> str:
    """The snapshot as Prometheus exposition text (one `# TYPE` line per metric)."""
    label = f'model="{model_id}"'
    lines = ["# TYPE vffn_requests_total counter"]
    for outcome, n in sorted(s["requests"].items()):
        lines.append(f'vffn_requests_total{{{label},outcome="{outcome}"}} {n}')
    rows = [("prompt_tokens_total", "counter", s["prompt_tokens"]),
            ("completion_tokens_total", "counter", s["completion_tokens"]),
            ("decode_steps_total", "counter", s["decode_steps"]),
            ("prefill_calls_total", "counter", s["prefill_calls"]),
            ("tokens_per_second", "gauge", s["tokens_per_s"]),
            ("queue_depth", "gauge", s["queue_depth"]),
            ("slots", "gauge", s["slots"]),
            ("slots_in_use", "gauge", s["slots_in_use"]),
            ("ffn_loops_executed_total", "counter", s["loops_executed"]),
            ("ffn_loops_free_slots_total", "counter", s["loops_free_slots"]),
            ("ffn_token_depth_total", "counter", s["token_depth"]),
            ("ffn_token_layers_total", "counter", s["token_layers"]),
            ("ffn_executed_loops_per_token", "gauge", s["executed_loops_per_token_in_use"]),
            ("ffn_executed_loops_per_token_all_slots", "gauge", s["executed_loops_per_token"]),
            ("ffn_mean_token_depth", "gauge", s["mean_token_depth"])]
    for name, kind, value in rows:
        lines += [f"# TYPE vffn_{name} {kind}", f"vffn_{name}{{{label}}} {float(value):.6g}"]
    return "\n".join(lines) + "\n"
