"""Serve a trained (or exported, or Hugging Face-imported) run over an OpenAI-compatible HTTP API, with
continuous batching: a fixed number of decode slots over one KV cache, a new request prefilled into a free slot
while the others keep decoding, every token at its own FFN depth.

Routes: POST /v1/completions (prompt text or token ids, max_tokens, temperature, top_p, top_k, seed, stop,
stream, logprobs, echo), POST /v1/chat/completions (only when the run's tokenizer brings a chat template),
GET /v1/models, GET /health, GET /metrics (Prometheus text). See docs/serve.md.

Examples:
  python serve.py --workdir runs/tiny
  python serve.py --workdir runs/tiny --port 0 --slots 32
  VFFN_API_KEY=secret python serve.py --workdir runs/tiny --host 0.0.0.0 --port 8000

  curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "And God said", "max_tokens": 32, "temperature": 0}'

Once listening it prints one line, `serving MODEL on http://HOST:PORT` (with --port 0, the port it picked).
The server listens on the loopback address unless --host says otherwise; any other address needs an API key
(--api-key or the VFFN_API_KEY environment variable), which every request except /health and /metrics must
send as `Authorization: Bearer KEY` (else 401). SIGTERM or Ctrl-C: new requests get 503, in-flight ones get
--drain-seconds to finish (then they are cancelled), and the command exits 0.

Exit status: 0 stopped by SIGTERM/SIGINT, 2 bad input (a missing run or step, a bad flag value, a non-loopback
--host without an API key, an address in use), 3 checkpoint does not match the config.
"""
from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import signal
import sys
import threading

from vffn_jax.cli import runner

API_KEY_ENV = "VFFN_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = runner.parser("vffn-serve", __doc__)
    p.add_argument("--workdir", required=True, help="a training run, an export (vffn-export) or an imported "
                   "Hugging Face model's run, local or gs://")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only; "
                   "any other address needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = a free port, "
                   "printed at start)")
    p.add_argument("--slots", type=int, default=8, metavar="N", help="decode slots: requests generated together "
                   "(default 8; rounded up to the data-parallel size); more wait in a queue")
    p.add_argument("--steps-per-call", type=int, default=8, metavar="K",
                   help="decode steps per device call (default 8): one host round trip per K tokens; a finished "
                        "request's slot and a new request wait at most K steps (lower K for a shorter time to "
                        "first token under load, raise it for throughput)")
    p.add_argument("--max-tokens-default", type=int, default=16, metavar="N",
                   help="max_tokens of a request that gives none (default 16, as OpenAI's completions)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require `Authorization: Bearer KEY` on every request but /health and /metrics "
                        f"(default: the {API_KEY_ENV} environment variable; none on loopback)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients name (default vffn-<run folder>-step<N>)")
    p.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, how long in-flight requests get to finish before they are cancelled "
                        "(default 30)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not compile the decode programs before listening (the first request compiles them)")
    runner.add_overrides_argument(p)
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args) -> str | None:
    """The API key to require; ConfigError naming the flag for a bad value."""
    from vffn_jax.config import ConfigError

    if args.slots < 1:
        raise ConfigError(f"--slots={args.slots} must be >= 1")
    if args.steps_per_call < 1:
        raise ConfigError(f"--steps-per-call={args.steps_per_call} must be >= 1")
    if args.max_tokens_default < 0:
        raise ConfigError(f"--max-tokens-default={args.max_tokens_default} must be >= 0")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port={args.port} must be in 0..65535")
    if not args.drain_seconds >= 0:
        raise ConfigError(f"--drain-seconds={args.drain_seconds} must be >= 0")
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not key:
        raise ConfigError(f"--host {args.host} is not a loopback address: give an API key (--api-key KEY or the "
                          f"{API_KEY_ENV} environment variable) so that only your clients can use the server")
    return key


def main(argv=None, *, ready=None, stop: threading.Event | None = None) -> int:
    """`ready(server)` is called once listening; `stop` (tests) ends the server like SIGTERM does."""
    args = build_parser().parse_args(argv)
    runner.quiet_startup()
    from vffn_jax import errors
    from vffn_jax.config import ConfigError, parse_set_args
    from vffn_jax.serve import served as served_lib
    from vffn_jax.serve.app import AppOptions
    from vffn_jax.serve.engine import Engine
    from vffn_jax.serve.server import ServerThread

    stop = stop or threading.Event()
    try:
        key = check_args(args)
        served = served_lib.load(args.workdir, args.step, parse_set_args(args.overrides), args.model_name)
        engine = Engine(served, args.slots, steps_per_call=args.steps_per_call).start()
        if not args.no_warmup:
            engine.warmup()
        server = ServerThread(engine, served, AppOptions(key, args.max_tokens_default), args.host, args.port)
        try:
            server.start()
        except OSError as e:
            engine.close()
            raise ConfigError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another --port "
                              "(0 = any free one)") from None
    except Exception as e:
        return errors.report(e)

    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    else:
        previous = {}
    try:
        # the loaded model's and compiled programs' Python objects live as long as the server: out of the
        # collector's sight, its full passes stop stalling every slot (one took 150 ms on the tiny model)
        gc.freeze()
        print(f"serving {served.model_id} on {server.url} ({engine.slots} slots, context {served.context})",
              flush=True)
        if ready is not None:
            ready(server)
        while not stop.wait(0.5):
            pass
        print(f"stopping: draining in-flight requests (up to {args.drain_seconds:g} s)", file=sys.stderr, flush=True)
        clean = server.drain(args.drain_seconds)
        if not clean:
            print("stopped: requests still in flight after --drain-seconds were cancelled", file=sys.stderr,
                  flush=True)
    finally:
        gc.unfreeze()  # a caller in the same process (a test, a notebook) gets its collector back
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def console() -> None:
    """The `vffn-serve` console script (and `python serve.py`)."""
    runner.console(main)


if __name__ == "__main__":
    console()
