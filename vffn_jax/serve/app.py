"""The HTTP routes (aiohttp): POST /v1/completions, POST /v1/chat/completions, GET /v1/models, /health, /metrics.

Every request to the engine becomes a `Stream`: its events come from the engine thread through a `Mailbox` into
an asyncio queue. Streaming answers are server-sent events (`data: {...}` per
chunk, then `data: [DONE]`); a client that goes away mid-stream cancels its request, which frees its slot before
the next decode step. Whatever goes wrong in a request is answered as an OpenAI-style JSON error, never by
stopping the server.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import json
import logging
import threading
import time

from aiohttp import web

from vffn_jax.serve import protocol, textout
from vffn_jax.serve.engine import Engine, EngineClosed
from vffn_jax.serve.request import Event
from vffn_jax.serve.metrics import prometheus
from vffn_jax.serve.protocol import ApiError

log = logging.getLogger(__name__)
MAX_BODY = 8 << 20  # bytes: a bigger request body is answered 413
OPEN_PATHS = ("/health", "/metrics")  # no API key needed (load balancers, scrapers)


@dataclasses.dataclass
class AppOptions:
    api_key: str | None = None
    max_tokens_default: int = 16


@dataclasses.dataclass
class AppState:
    draining: bool = False


def error_response(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPException as e:  # aiohttp's own: unknown route 404, wrong method 405, body too large 413
        if e.status < 400:
            raise
        return error_response(ApiError(e.status, f"{e.reason}: {request.method} {request.path}", None,
                                       e.reason.lower().replace(" ", "_")))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:  # a bug: logged, answered 500, and the server goes on
        log.exception("request %s %s failed", request.method, request.path)
        return error_response(ApiError(500, "internal server error; see the server log", None, "internal_error"))


def auth_middleware(api_key: str | None):
    @web.middleware
    async def check(request: web.Request, handler):
        if api_key and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip(), api_key)):
                raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", None,
                               "invalid_api_key")
        return await handler(request)

    return check


class Mailbox:
    """Carries events from the engine thread to one event loop. The engine hands out a decode call's events to
    every slot's request in one burst; each `call_soon_threadsafe` writes to the loop's wake-up pipe, so a burst
    wakes the loop once (the first event schedules the delivery, the others join it) instead of once per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


class Stream:
    """One engine request's events on the event loop (`queue` may be shared by several: items are (index, ev))."""

    def __init__(self, engine: Engine, request, index: int, queue: asyncio.Queue, mailbox: Mailbox):
        self.request, self.index = request, index
        self.handle = engine.submit(request, lambda ev: mailbox.put(queue, (index, ev)))


async def read_json(request: web.Request):
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes", None, "request_too_large") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None


def _failure(ev: Event) -> ApiError | None:
    if ev.finish_reason == "cancelled":
        return ApiError(503, "the request was cancelled: the server is shutting down", None, "server_shutting_down")
    if ev.finish_reason == "error":
        return ApiError(500, ev.error or "internal error", None, "internal_error")
    return None


def _extra(ev: Event) -> dict:
    """Beyond OpenAI's fields (clients ignore it): the kept token ids and their mean FFN depth."""
    return {"vffn": {"token_ids": ev.ids[:ev.kept_tokens], "mean_depth": round(ev.mean_depth, 4)}}


class Routes:
    def __init__(self, engine: Engine, served, options: AppOptions, state: AppState):
        self.engine, self.served, self.options, self.state = engine, served, options, state
        self._mailbox: Mailbox | None = None  # made on the server's loop, at its first request

    def _admit(self):
        if self.state.draining:
            raise ApiError(503, "the server is shutting down and admits no new requests", None,
                           "server_shutting_down")

    def _start(self, call: protocol.Call) -> tuple[list[Stream], asyncio.Queue]:
        self._admit()
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        streams: list[Stream] = []
        try:
            for i, r in enumerate(call.requests):
                streams.append(Stream(self.engine, r, i, queue, self._mailbox))
        except EngineClosed:
            for s in streams:
                self.engine.cancel(s.handle)
            raise ApiError(503, "the server is shutting down and admits no new requests", None,
                           "server_shutting_down") from None
        return streams, queue

    async def completions(self, request: web.Request):
        call = protocol.parse_completion(await read_json(request), self.served, self.options.max_tokens_default)
        return await self._answer(request, call)

    async def chat(self, request: web.Request):
        call = protocol.parse_chat(await read_json(request), self.served, self.options.max_tokens_default)
        return await self._answer(request, call)

    async def _answer(self, request: web.Request, call: protocol.Call):
        streams, queue = self._start(call)
        try:
            if call.stream:
                return await self._sse(request, call, streams, queue)
            return await self._whole(call, streams, queue)
        finally:
            for s in streams:  # nothing if it finished; otherwise its slot is freed before the next step
                self.engine.cancel(s.handle)

    async def _whole(self, call: protocol.Call, streams: list[Stream], queue: asyncio.Queue):
        texts = [[] for _ in streams]
        tokens = [[] for _ in streams]
        final: list[Event | None] = [None] * len(streams)
        while any(f is None for f in final):
            i, ev = await queue.get()
            texts[i].append(ev.text)
            tokens[i] += ev.tokens
            if ev.finish_reason is not None:
                final[i] = ev
        choices, n_prompt, n_done = [], 0, 0
        for s, text, toks, ev in zip(streams, texts, tokens, final):
            bad = _failure(ev)
            if bad is not None:
                raise bad
            r = s.request
            lp = None
            if r.logprobs is not None:
                keep = (len(r.prompt_ids) if r.echo else 0) + ev.kept_tokens
                lp = textout.logprobs_object(toks[:keep])
            choices.append(protocol.choice(call.kind, s.index, "".join(text), ev.finish_reason, lp, _extra(ev)))
            n_prompt += ev.prompt_tokens
            n_done += ev.completion_tokens
        rid = protocol.new_id(call.kind)
        return web.json_response(protocol.envelope(call.kind, rid, call.model, choices,
                                                   protocol.usage(n_prompt, n_done), chunk=False))

    async def _sse(self, request: web.Request, call: protocol.Call, streams: list[Stream], queue: asyncio.Queue):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        rid, created = protocol.new_id(call.kind), int(time.time())
        offsets = [0] * len(streams)
        first = [True] * len(streams)
        done = [False] * len(streams)
        n_prompt = n_done = 0

        async def send(obj) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        try:
            while not all(done):
                i, ev = await queue.get()
                bad = _failure(ev)
                if bad is not None:
                    done[i] = True
                    await send(bad.body())
                    continue
                r = streams[i].request
                lp = None
                if r.logprobs is not None and call.kind == "completion":
                    lp = textout.logprobs_object(ev.tokens, offsets[i])
                    offsets[i] += sum(len(t.text) for t in ev.tokens)
                if not ev.text and not ev.tokens and not ev.generated and ev.finish_reason is None:
                    continue
                extra = _extra(ev) if ev.finish_reason else None
                c = protocol.choice(call.kind, i, ev.text, ev.finish_reason, lp, extra, delta=True, first=first[i])
                first[i] = False
                await send(protocol.envelope(call.kind, rid, call.model, [c], None, chunk=True, created=created))
                if ev.finish_reason is not None:
                    done[i] = True
                    n_prompt += ev.prompt_tokens
                    n_done += ev.completion_tokens
            if call.include_usage:
                await send(protocol.envelope(call.kind, rid, call.model, [], protocol.usage(n_prompt, n_done),
                                             chunk=True, created=created))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionError, RuntimeError) as e:  # the client went away: `_answer` cancels its requests
            log.debug("stream %s ended by the client: %s", rid, e)
        return resp

    async def models(self, request: web.Request):
        return web.json_response({"object": "list", "data": [self._model()]})

    async def model(self, request: web.Request):
        name = request.match_info["name"]
        if name != self.served.model_id:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.served.model_id}'",
                           "model", "model_not_found")
        return web.json_response(self._model())

    def _model(self) -> dict:
        s = self.served
        return {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "vffn_jax",
                "context_length": s.context, "workdir": s.workdir, "step": s.step}

    async def health(self, request: web.Request):
        queued, used = self.engine.busy()
        return web.json_response({"status": "draining" if self.state.draining else "ok",
                                  "model": self.served.model_id, "slots": self.engine.slots,
                                  "slots_in_use": used, "queue_depth": queued},
                                 status=503 if self.state.draining else 200)

    async def metrics(self, request: web.Request):
        return web.Response(text=prometheus(self.engine.metrics.snapshot(), self.served.model_id),
                            content_type="text/plain", headers={"X-Prometheus-Format": "0.0.4"})


def build_app(engine: Engine, served, options: AppOptions, state: AppState | None = None) -> web.Application:
    state = state or AppState()
    app = web.Application(middlewares=[errors_middleware, auth_middleware(options.api_key)], client_max_size=MAX_BODY)
    r = Routes(engine, served, options, state)
    app.router.add_post("/v1/completions", r.completions)
    app.router.add_post("/v1/chat/completions", r.chat)
    app.router.add_get("/v1/models", r.models)
    app.router.add_get("/v1/models/{name}", r.model)
    app.router.add_get("/health", r.health)
    app.router.add_get("/metrics", r.metrics)
    return app
