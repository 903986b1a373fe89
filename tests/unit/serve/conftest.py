"""One served model and one in-process server for the serve tests (vffn_jax/serve/): the session's
`params_only_run` (tiny versatile model, byte tokenizer, context 48, routing that varies), 8 slots, listening on
127.0.0.1 on a free port from a thread of this process. Read-only: a test that drains or stops a server starts
its own (`start_server`)."""
from __future__ import annotations

import pytest

from vffn_jax.serve import served as served_lib
from vffn_jax.serve.app import AppOptions
from vffn_jax.serve.engine import Engine
from vffn_jax.serve.server import ServerThread


@pytest.fixture(scope="session")
def served(params_only_run):
    return served_lib.load(params_only_run)


@pytest.fixture(scope="session")
def engine(served):
    eng = Engine(served, slots=8).start()
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def bucketed_engine(served):
    """Twice the slots of the data-parallel size, so a decode call computes 8 or 16 rows by what is in flight."""
    eng = Engine(served, slots=16).start()
    yield eng
    eng.close()


def start_server(engine, served, *, api_key=None, owns_engine=False, max_tokens_default=16) -> ServerThread:
    return ServerThread(engine, served, AppOptions(api_key, max_tokens_default), "127.0.0.1", 0,
                        owns_engine=owns_engine).start()


@pytest.fixture(scope="session")
def server(engine, served):
    srv = start_server(engine, served)
    yield srv
    srv.stop()
