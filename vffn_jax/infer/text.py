"""Text in, text out, over `infer.decode.generate`: prompts encoded and checked against the context, decoded in
batches of rows, and the per-token records (id, text, log-probability, depth per layer, executed loops) that
`vffn-generate --json` prints. The generate command and the lm-eval backend's `generate_until` both call
`generate_in_batches`."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vffn_jax.errors import ConfigError
from vffn_jax.infer import decode, sampling


def encode_prompts(tokenizer, prompts: Sequence[str], *, context: int, eos_prefix: bool = True) -> list[list[int]]:
    """Each prompt's tokens (after the EOS token, a document start, unless `eos_prefix` is False); ConfigError
    naming the prompt when one is empty or longer than `context`."""
    prefix = [tokenizer.eos_id] if eos_prefix else []
    encoded = [prefix + tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ConfigError(f"prompt {i + 1} is empty; with --no-eos-prefix a prompt needs text")
        if len(ids) > context:
            raise ConfigError(f"prompt {i + 1} is {len(ids)} tokens long{' with the EOS prefix' if prefix else ''}, "
                              f"longer than the model's context of {context} tokens (train.seq_len); shorten it")
    return encoded


def generate_in_batches(m, params, encoded: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
                        context: int, sampling_cfg: sampling.SamplingConfig, seed: int, eos_id: int | None,
                        valid_vocab: int | None, mesh, seed_per_batch: bool = True
                        ) -> tuple[list[decode.Generation], dict[str, Any]]:
    """`decode.generate` over `encoded` in batches of `batch_size` rows; returns the generations in order and the
    summed timings. With `seed_per_batch`, batch starting at row r samples with `seed + r` (a prompt's sample
    then depends on its position only, not on the other prompts in its batch)."""
    gens: list[decode.Generation] = []
    totals = {"prefill_s": 0.0, "decode_s": 0.0, "decode_tokens": 0}
    for start in range(0, len(encoded), batch_size):
        g, st = decode.generate(m, params, encoded[start:start + batch_size], max_new_tokens=max_new_tokens,
                                context=context, sampling_cfg=sampling_cfg,
                                seed=seed + start if seed_per_batch else seed, eos_id=eos_id,
                                valid_vocab=valid_vocab, mesh=mesh)
        gens += g
        totals["prefill_s"] += st.prefill_s
        totals["decode_s"] += st.decode_s
        totals["decode_tokens"] += st.decode_tokens
    return gens, totals


def record(tokenizer, prompt: str, g: decode.Generation) -> dict[str, Any]:
    """One generation as `vffn-generate --json` prints it: the text, why it stopped, mean depth/loops/log-prob,
    and per generated token its id, text, log-probability, depth per layer and the loops each layer ran."""
    depth = np.asarray(g.depth, np.float64)
    toks = [{"id": int(t), "text": tokenizer.decode([t]), "logprob": float(lp), "depth": [int(x) for x in d],
             "mean_depth": float(np.mean(d)), "loops": [round(float(x), 4) for x in lo]}
            for t, lp, d, lo in zip(g.ids, g.logprobs, g.depth, g.loops)]
    return {"prompt": prompt, "prompt_tokens": len(g.prompt_ids), "text": tokenizer.decode(g.ids),
            "finish_reason": g.finish_reason, "n_tokens": len(g.ids),
            "mean_depth": float(depth.mean()) if depth.size else 0.0,
            "mean_loops": float(np.mean(g.loops)) if len(g.loops) else 0.0,
            "mean_logprob": float(np.mean(g.logprobs)) if g.logprobs else 0.0,
            "tokens": toks}
