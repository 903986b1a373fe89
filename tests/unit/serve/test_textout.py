"""One request's text (vffn_jax/serve/textout.py): stop strings cut exactly, nothing of a stop string or of a
half UTF-8 character is streamed early, logprob objects."""
import pytest

from vffn_jax.data.tokenizer import ByteTokenizer
from vffn_jax.serve import textout

TOK = ByteTokenizer()


def _feed(text: str, stops=()):
    st = textout.TextState(TOK.decode, tuple(stops))
    deltas = []
    for b in text.encode():
        st.add(b)
        deltas.append(st.delta(final=False))
        if st.stopped:
            break
    deltas.append(st.delta(final=True))
    return st, deltas


def test_stop_string_cuts_and_is_never_streamed():
    st, deltas = _feed("hello END world", ["END"])
    assert st.stopped and st.text == "hello " and "".join(deltas) == "hello "
    assert all("E" not in d for d in deltas)
    assert st.kept_tokens() == len("hello ")


def test_held_back_tail_is_released_when_it_is_not_a_stop():
    st, deltas = _feed("a EN b", ["END"])
    assert not st.stopped and "".join(deltas) == "a EN b"
    assert st.kept_tokens() == len("a EN b".encode())


def test_multibyte_characters_are_streamed_whole():
    st, deltas = _feed("héllo ✓", [])
    assert "".join(deltas) == "héllo ✓" and not any("\ufffd" in d for d in deltas)


def test_stop_cut_and_held_back():
    assert textout.stop_cut("abcXYd", ["XY", "c"]) == 2
    assert textout.stop_cut("abc", ["z"]) is None
    assert textout.held_back("abcX", ["XY"]) == 1 and textout.held_back("abc", ["XY"]) == 0


def test_logprobs_object():
    toks = [textout.TokenInfo(1, "ab", None, None), textout.TokenInfo(2, "c", -0.5, {"c": -0.5})]
    obj = textout.logprobs_object(toks, 3)
    assert obj == {"tokens": ["ab", "c"], "token_logprobs": [None, -0.5], "top_logprobs": [None, {"c": -0.5}],
                   "text_offset": [3, 5]}
    assert textout.top_dict(TOK.decode, [65, 66], [-0.1, -2.0], 1) == {"A": -0.1}


def test_several_tokens_at_once_stream_whole_characters():
    """The engine hands a decode call's tokens over together: a character split across two calls is held back
    until its last byte comes, and a request with stop strings must go token by token."""
    data = "a✓b".encode()  # the check mark is 3 bytes: split it across two calls
    st = textout.TextState(TOK.decode, ())
    st.extend(list(data[:3]))
    first = st.delta(final=False)
    st.extend(list(data[3:]))
    assert first == "a" and first + st.delta(final=True) == "a✓b" and st.kept_tokens() == len(data)
    with pytest.raises(ValueError, match="stop strings"):
        textout.TextState(TOK.decode, ("x",)).extend([65])
