"""`python serve.py` in a real process (vffn_jax/cli/serve.py): it prints its address on one line, and on SIGTERM
stops admitting (503, /health says draining), lets the in-flight stream finish, and exits 0 within the bound."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from vffn_jax.testing.processes import ROOT, child_env

CONTEXT = 1024  # long enough that a stream is still running while the test probes the draining server
DRAIN_S = 60


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A params-only tiny run whose context holds a stream of ~1000 tokens (the session run's holds 48)."""
    from vffn_jax.testing.shapes import write_params_only_run

    return write_params_only_run(tmp_path_factory.mktemp("serve_long") / "run", context=CONTEXT, step=1)


def _post(url, body):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        return e


def test_sigterm_drains_and_exits_0(long_run):
    proc = subprocess.Popen([sys.executable, "serve.py", "--workdir", str(long_run), "--port", "0", "--slots", "2",
                             "--drain-seconds", str(DRAIN_S)], cwd=ROOT, env=child_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the server listens (or the process dies: "")
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].split()[0]
        stream = _post(url, {"prompt": "", "max_tokens": CONTEXT, "temperature": 1.0, "seed": 3, "stream": True,
                             "ignore_eos": True})
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = t0 + 20
        while time.monotonic() < deadline:  # admission stops at once
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    pass
            except urllib.error.HTTPError as e:
                assert e.code == 503 and json.loads(e.read())["status"] == "draining"
                break
            time.sleep(0.02)
        late = _post(url, {"prompt": "late", "max_tokens": 2})
        assert late.code == 503 and json.loads(late.read())["error"]["code"] == "server_shutting_down"
        rest = stream.read().decode()
        chunks = [json.loads(x[6:]) for x in rest.split("\n\n") if x.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and rest.rstrip().endswith("data: [DONE]")
        assert proc.wait(timeout=DRAIN_S + 30) == 0
        assert time.monotonic() - t0 < DRAIN_S + 30
        assert "draining" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
