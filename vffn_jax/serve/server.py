"""The aiohttp server on its own event-loop thread, so the caller's thread stays free: the command line waits
for SIGTERM there, a test talks to the server from there.

`drain(seconds)`: new requests are answered 503 at once, in-flight ones get up to `seconds` to finish (then the
engine cancels them: a stream ends with an error event, a waiting client gets 503), and the server closes.
"""
from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from vffn_jax.serve.app import AppOptions, AppState, build_app
from vffn_jax.serve.engine import Engine

SHUTDOWN_S = 5.0  # after the engine stopped: how long open responses get to flush their last events


class ServerThread:
    def __init__(self, engine: Engine, served, options: AppOptions, host: str = "127.0.0.1", port: int = 0,
                 *, owns_engine: bool = True):
        self.engine, self.served, self.options, self.owns_engine = engine, served, options, owns_engine
        self.host, self.port = host, port
        self.state = AppState()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        """Binds (port 0: a free port, then `self.port` is it) and serves; OSError when the address is taken."""
        self._thread = threading.Thread(target=self._run, name="vffn-serve-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the HTTP server did not start in {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        # handler_cancellation: a client that hangs up cancels its handler, whose request then leaves the engine
        # (its slot is free at the next step) instead of generating an answer nobody reads
        runner = web.AppRunner(build_app(self.engine, self.served, self.options, self.state), handle_signals=False,
                               access_log=None, shutdown_timeout=SHUTDOWN_S, handler_cancellation=True)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as e:  # noqa: BLE001  (handed to start())
            self._error = e
            self._ready.set()
            loop.run_until_complete(runner.cleanup())
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def drain(self, seconds: float) -> bool:
        """Stops admitting, lets in-flight requests finish within `seconds`, closes; True if none was cut."""
        self.state.draining = True
        clean = self.engine.drain(seconds)
        self.stop()
        return clean

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(SHUTDOWN_S + 5)
        if self.owns_engine:  # several servers (e.g. with and without an API key) may share one engine
            self.engine.close()
