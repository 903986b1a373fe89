"""Draining (vffn_jax/serve/server.py): once asked to stop, new requests get 503 while an in-flight stream still
finishes, and the server closes within the bound; past the bound, what is left is cancelled."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

from vffn_jax.serve.app import AppOptions
from vffn_jax.serve.engine import Engine
from vffn_jax.serve.server import ServerThread


def _post(url, body, timeout=60):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        r = urllib.request.urlopen(req, timeout=timeout)  # left open: the caller reads the stream
        return r.status, r
    except urllib.error.HTTPError as e:
        return e.code, e


def _drain_while_streaming(served, drain_s, max_tokens):
    srv = ServerThread(Engine(served, slots=8).start(), served, AppOptions(), "127.0.0.1", 0).start()
    status, resp = _post(srv.url, {"prompt": "And God said", "max_tokens": max_tokens, "temperature": 1.0,
                                   "seed": 1, "stream": True, "ignore_eos": True})
    assert status == 200
    first = resp.readline()  # the stream has begun: the request is in flight
    assert first.startswith(b"data: ")
    result = {}
    t0 = time.monotonic()
    drainer = threading.Thread(target=lambda: result.setdefault("clean", srv.drain(drain_s)))
    drainer.start()
    while not srv.state.draining:
        time.sleep(0.01)
    refused = _post(srv.url, {"prompt": "late", "max_tokens": 2})[0] if drainer.is_alive() else None
    rest = resp.read().decode()
    drainer.join(drain_s + 30)
    return result.get("clean"), refused, rest, time.monotonic() - t0, drainer.is_alive()


def test_drain_finishes_in_flight_and_refuses_new(served):
    clean, refused, rest, took, alive = _drain_while_streaming(served, drain_s=60, max_tokens=30)
    assert not alive and clean is True
    assert refused in (503, None)  # None: the stream ended before the late request could be sent
    events = [json.loads(x[6:]) for x in rest.split("\n\n") if x.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and rest.rstrip().endswith("data: [DONE]")


def test_drain_bound_cancels_what_is_left(served):
    clean, refused, rest, took, alive = _drain_while_streaming(served, drain_s=0.0, max_tokens=40)
    assert not alive and clean is False and took < 20
    assert '"code": "server_shutting_down"' in rest  # the stream ends with an error event, then [DONE]
