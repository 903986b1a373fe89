"""Request bodies into engine requests, and OpenAI-style errors naming the field (vffn_jax/serve/protocol.py).
No model: a stand-in with the byte tokenizer and a context of 16."""
import types

import pytest

from vffn_jax.data.tokenizer import ByteTokenizer
from vffn_jax.serve import protocol
from vffn_jax.serve.protocol import ApiError

TOK = ByteTokenizer()
SERVED = types.SimpleNamespace(model_id="vffn-x-step1", tokenizer=TOK, context=16, valid_vocab=TOK.vocab_size,
                               eos_id=TOK.eos_id, chat_template=None)


def parse(body, kind="completion"):
    fn = protocol.parse_completion if kind == "completion" else protocol.parse_chat
    return fn(body, SERVED, 16)


def test_string_prompt_gets_the_eos_prefix_and_ids_are_taken_as_given():
    c = parse({"prompt": "ab", "max_tokens": 3, "temperature": 0, "stop": "\n", "seed": 5, "logprobs": 2,
               "echo": True})
    (r,) = c.requests
    assert r.prompt_ids == (TOK.eos_id, 97, 98) and r.max_tokens == 3 and r.temperature == 0.0
    assert r.stop == ("\n",) and r.seed == 5 and r.logprobs == 2 and r.echo and c.model == "vffn-x-step1"
    assert parse({"prompt": [1, 2, 3]}).requests[0].prompt_ids == (1, 2, 3)
    assert [r.prompt_ids for r in parse({"prompt": [[4], "c"]}).requests] == [(4,), (TOK.eos_id, 99)]
    assert parse({"prompt": "x"}).requests[0].max_tokens == 16  # the server's default
    assert parse({"prompt": "x", "top_k": -1}).requests[0].top_k == 0


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x" * 20}, 400, "prompt"),  # longer than the context (16) with the EOS prefix
    ({"prompt": list(range(17))}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": [999]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": None}, 400, "prompt"),
    ({}, 400, "prompt"),
    ([1, 2], 400, None),
])
def test_bad_fields_are_named(body, status, param):
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.status == status and e.value.param == param
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_chat_without_a_template_is_a_clear_400():
    with pytest.raises(ApiError) as e:
        parse({"messages": [{"role": "user", "content": "hi"}]}, "chat")
    assert e.value.status == 400 and "chat template" in e.value.message


def test_chat_with_a_template_renders_it():
    served = types.SimpleNamespace(**{**vars(SERVED), "chat_template":
                                      "{% for m in messages %}<{{ m.role[0] }}>{{ m.content }}{% endfor %}"
                                      "{% if add_generation_prompt %}<a>{% endif %}"})
    c = protocol.parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, served, 16)
    assert TOK.decode(c.requests[0].prompt_ids) == "<u>hi<a>" and c.kind == "chat"
    with pytest.raises(ApiError) as e:
        protocol.parse_chat({"messages": "hi"}, served, 16)
    assert e.value.param == "messages"


def test_responses():
    body = protocol.envelope("completion", "cmpl-1", "m", [protocol.choice("completion", 0, "hi", "stop", None)],
                             protocol.usage(3, 2), chunk=False)
    assert body["object"] == "text_completion" and body["usage"]["total_tokens"] == 5
    chunk = protocol.envelope("chat", "c", "m", [protocol.choice("chat", 0, "x", None, None, delta=True, first=True)],
                              None, chunk=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"]["role"] == "assistant"
    assert "usage" not in chunk
