"""The tokenizer files of a Hugging Face export: `tokenizer.json` and `tokenizer_config.json`.

`AutoTokenizer.from_pretrained(DIR)` then encodes and decodes exactly as the run's own tokenizer
(`vffn_jax.data.tokenizer.load_tokenizer(data.tokenizer)`):

* a HF `tokenizers` JSON file (a path, gs:// included, or "olmo"): copied unchanged;
* "byte": an equivalent `tokenizers` tokenizer is built: a BPE model without merges over the 256
  byte-level characters (GPT-2's byte -> printable character table), so every UTF-8 byte b is one token
  with id b, plus the special token "<|endoftext|>" with id 256 (the EOS); the ByteLevel decoder turns
  the ids back into bytes and decodes them as UTF-8, invalid sequences replaced like `ByteTokenizer.decode`
  (pass `skip_special_tokens=True` to drop the EOS as `ByteTokenizer.decode` does). The text "<|endoftext|>"
  encodes as its bytes (`split_special_tokens`), as in ByteTokenizer.

Neither adds special tokens on encode (vffn_jax encodes without them); `generate.py` puts the EOS token
before each prompt, which a HF caller does by prepending `tokenizer.eos_token_id`.
"""
from __future__ import annotations

import json
from pathlib import Path

BYTE_EOS = "<|endoftext|>"


def byte_level_chars() -> list[str]:
    """GPT-2's printable character for each byte 0..255 (the table `tokenizers`' ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer():
    """A `tokenizers.Tokenizer` equal to `ByteTokenizer`: ids 0..255 the UTF-8 bytes, 256 the EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(byte_level_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOS])
    assert tok.token_to_id(BYTE_EOS) == 256
    return tok


def write(spec: str, out: Path, *, context: int) -> dict:
    """Writes the tokenizer files for the run's `data.tokenizer` into `out`; returns {"eos_id", "eos_token",
    "vocab_size"} (vocab_size: the tokenizer's, which may be smaller than the model's embedding rows)."""
    from transformers import PreTrainedTokenizerFast

    from vffn_jax import storage
    from vffn_jax.data.tokenizer import ByteTokenizer, load_tokenizer

    ours = load_tokenizer(spec)
    byte = isinstance(ours, ByteTokenizer)
    if byte:
        tok_obj, eos_token = byte_tokenizer(), BYTE_EOS
    else:
        from tokenizers import Tokenizer

        raw = storage.as_path(ours.path).read_bytes()
        tok_obj = Tokenizer.from_str(raw.decode("utf-8"))
        eos_token = tok_obj.id_to_token(ours.eos_id)
    # transformers writes both files itself, so they are what its own loader expects.
    # split_special_tokens: ByteTokenizer encodes the text "<|endoftext|>" as its 13 bytes, never as the EOS id
    # (a tokenizers JSON file's own encode does match its special tokens in text, so it keeps that)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok_obj, eos_token=eos_token, bos_token=eos_token,
                                   pad_token=eos_token, model_max_length=context, clean_up_tokenization_spaces=False,
                                   split_special_tokens=byte)
    fast.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    # the class name older transformers also know (5.x: an alias of TokenizersBackend); not the model's own
    # tokenizer class, which for model_type llama would be a Metaspace (sentencepiece-style) tokenizer
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    if not byte:  # the run's own file, byte for byte
        (out / "tokenizer.json").write_bytes(raw)
    return {"eos_id": ours.eos_id, "eos_token": eos_token, "vocab_size": ours.vocab_size}
