"""The `vffn-serve` command line (vffn_jax/cli/serve.py), in-process: every flag in --help, bad input exits 2
naming the flag (a non-loopback --host without an API key is refused), and a server started on port 0 prints
its address on one line, answers, and exits 0 when stopped."""
from __future__ import annotations

import json
import re
import threading
import urllib.request

import pytest

from vffn_jax.cli import serve
from vffn_jax.testing import cli

FLAGS = ("--workdir", "--step", "--host", "--port", "--slots", "--steps-per-call", "--max-tokens-default", "--api-key", "--model-name",
         "--drain-seconds", "--no-warmup", "--set")


def test_help_names_every_flag():
    r = cli.call(serve.main, "--help")
    assert r.returncode == 0
    for flag in FLAGS:
        assert flag in r.stdout, flag
    assert "VFFN_API_KEY" in r.stdout and "Exit status" in r.stdout


@pytest.mark.parametrize("args,match", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--slots", "0"], "--slots"),
    (["--steps-per-call", "0"], "--steps-per-call"),
    (["--port", "70000"], "--port"),
    (["--max-tokens-default", "-1"], "--max-tokens-default"),
])
def test_bad_flags_exit_2(params_only_run, monkeypatch, args, match):
    monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
    r = cli.call(serve.main, "--workdir", params_only_run, *args)
    assert r.returncode == 2 and match in r.stderr, r.stderr


def test_missing_run_exits_2(tmp_path):
    r = cli.call(serve.main, "--workdir", tmp_path / "nothing")
    assert r.returncode == 2 and "error" in r.stderr


def test_non_loopback_with_a_key_from_the_environment_is_allowed(monkeypatch):
    monkeypatch.setenv(serve.API_KEY_ENV, "k")
    args = serve.build_parser().parse_args(["--workdir", "x", "--host", "0.0.0.0"])
    assert serve.check_args(args) == "k"
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and not serve.is_loopback("10.0.0.1")


def _serve_in_thread(argv):
    stop, seen, out = threading.Event(), threading.Event(), {}

    def ready(server):
        out["server"] = server
        seen.set()

    t = threading.Thread(target=lambda: out.setdefault("rc", serve.main(argv, ready=ready, stop=stop)))
    t.start()
    return t, stop, seen, out


def test_serves_on_port_0_and_stops_with_status_0(params_only_run, capsys):
    t, stop, seen, out = _serve_in_thread(["--workdir", str(params_only_run), "--port", "0", "--no-warmup"])
    try:
        assert seen.wait(120), "the server did not start"
        url = out["server"].url
        body = json.dumps({"prompt": "Amen", "max_tokens": 2, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] >= 1
        # the address is taken now: a second server on it exits 2 naming --port
        port = out["server"].port
        r2 = cli.call(serve.main, "--workdir", params_only_run, "--port", port, "--no-warmup")
        assert r2.returncode == 2 and "--port" in r2.stderr
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive() and out["rc"] == 0
    printed = capsys.readouterr().out
    assert re.search(r"^serving vffn-run-step3 on http://127\.0\.0\.1:\d+ ", printed, re.M), printed


