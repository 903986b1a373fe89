"""Generate text from a trained (or exported) run with a KV cache, showing how deep each token went.

Restores the parameters only (like eval.py) onto the devices that exist now, encodes the prompts with
the run's tokenizer, and continues them in one batch (prefill, then one token per step). Every FFN
variant decodes. For the depth-routed ones (versatile, depth_only, versatile_avg) each token runs its
own argmax depth in every layer; a step executes, per layer, each loop only on the rows that need it
(model.depth_exec=compact, the default; --set model.depth_exec=masked runs every row as deep as the
deepest). A generated token's depth is that of the forward pass that produced it (run on the token
before it), so it is the compute the model spent choosing it.

Plain output marks each generated piece with its mean depth over layers: coloured backgrounds on a
terminal (legend first), `piece[2.25]` otherwise (--depth-marks). --json prints one object with, per
generated token, its id, text, log-probability (the model's own, temperature 1, unfiltered), per-layer
depth (1..L) and the loops each layer executed in that step.

Examples:
  python generate.py --workdir runs/tiny --prompt "And God said"
  python generate.py --workdir runs/tiny --prompt "In the beginning" --temperature 0 --max-new-tokens 80
  python generate.py --workdir runs/tiny --prompts prompts.jsonl --top-p 0.9 --seed 1 --json > out.json
  python generate.py --workdir runs/tiny-export --prompt "Jesus wept" --depth-marks brackets

Prompts are preceded by the tokenizer's EOS token (a document start, as in the packed training
stream; --no-eos-prefix to leave it out) and may hold up to train.seq_len tokens with it; a row stops
at EOS (unless --ignore-eos), after --max-new-tokens, or when the context is full.

Exit status: 0 ok, 2 bad input (no prompts, an empty prompts file, a prompt longer than the context,
--temperature < 0, --top-p outside (0, 1], --top-k < 0, --max-new-tokens < 1), a missing run, config
or checkpoint step, or a damaged checkpoint, 3 checkpoint does not match the config, 4 peers missing
at start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vffn_jax.cli import runner

# 256-colour backgrounds from shallow (blue) to deep (red); black text on them
DEPTH_COLOURS = (153, 195, 229, 223, 217, 210)


def build_parser() -> argparse.ArgumentParser:
    p = runner.parser("vffn-generate", __doc__)
    p.add_argument("--workdir", required=True,
                   help="a training run or an export (vffn-export), local or gs://")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt to continue (repeatable; an empty string samples from a document start)")
    p.add_argument("--prompts", "--prompts-file", dest="prompts_file", metavar="FILE", default=None,
                   help="prompts from a file, local or gs://: FILE.jsonl holds one JSON object per line with a "
                        "\"prompt\" (or \"text\") field, or a JSON string; any other file is one prompt per line "
                        "(blank lines are skipped). With --prompt, these come after")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate per prompt "
                   "(default 64; fewer when EOS comes first or the context fills)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only (default 0 = off)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches p, in (0, 1] "
                        "(default 0.95; 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (a prompt's sample does not depend on the "
                   "other prompts in its batch)")
    p.add_argument("--batch-size", type=int, default=32, metavar="ROWS",
                   help="prompts decoded together (default 32; rounded up to the data-parallel size)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after an EOS token")
    p.add_argument("--no-eos-prefix", action="store_true", help="do not put the EOS token before each prompt")
    p.add_argument("--depth-marks", choices=("auto", "color", "brackets", "none"), default="auto",
                   help="how plain output shows each generated piece's mean depth: ANSI colours, piece[depth], or "
                        "nothing (default auto: colours on a terminal, brackets otherwise; none for variants "
                        "without a depth router)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    runner.add_overrides_argument(p)
    runner.add_distributed_arguments(p)
    return p


# --------------------------------------------------------------------------- formatting


def fmt_depth(x: float) -> str:
    """2.25, 2.5, 3 (shortest exact form for means over a few layers)."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def pieces(tokenizer, ids, depth_rows):
    """[(text, mean depth)] grouping tokens whose bytes only decode together (UTF-8 split over tokens)."""
    out, pending, pend_depth = [], [], []
    for tok, d in zip(ids, depth_rows):
        pending.append(tok)
        pend_depth.append(float(sum(d)) / max(len(d), 1))
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd") or len(pending) >= 4:
            out.append((text, sum(pend_depth) / len(pend_depth)))
            pending, pend_depth = [], []
    if pending:
        out.append((tokenizer.decode(pending), sum(pend_depth) / len(pend_depth)))
    return out


def colour_of(depth: float, max_depth: int) -> int:
    frac = 0.0 if max_depth <= 1 else (depth - 1) / (max_depth - 1)
    return DEPTH_COLOURS[min(len(DEPTH_COLOURS) - 1, max(0, round(frac * (len(DEPTH_COLOURS) - 1))))]


def paint(text: str, depth: float, max_depth: int) -> str:
    return f"\x1b[30;48;5;{colour_of(depth, max_depth)}m{text}\x1b[0m"


def format_text(result: dict, tokenizer, marks: str) -> str:
    L = result["max_depth"]
    lines = [f"{result['scale']}/{result['variant']} (ffn={result['ffn']}) step {result['step']}   "
             f"{result['workdir']}"]
    if marks == "color":
        legend = " ".join(paint(f" {d} ", d, L) for d in range(1, L + 1))
        lines.append(f"mean depth over {result['n_layers']} layers (loops per token): {legend}")
    elif marks == "brackets":
        lines.append(f"each generated piece is followed by [its mean depth over {result['n_layers']} layers, 1..{L}]")
    for i, g in enumerate(result["generations"]):
        ids = [t["id"] for t in g["tokens"]]
        if marks == "none":
            body = g["text"]
        else:
            parts = pieces(tokenizer, ids, [t["depth"] for t in g["tokens"]])
            body = "".join(paint(t, d, L) if marks == "color" else f"{t}[{fmt_depth(d)}]" for t, d in parts)
        lines.append("")
        lines.append(f"--- [{i + 1}/{len(result['generations'])}] {len(ids)} tokens, {g['finish_reason']}, "
                     f"mean depth {g['mean_depth']:.2f}, executed loops/step {g['mean_loops']:.2f}, "
                     f"mean log-prob {g['mean_logprob']:.3f}")
        lines.append(g["prompt"] + body)
    lines.append("")
    lines.append(f"prefill {result['prefill_s']:.2f} s, decode {result['decode_tokens']} tokens in "
                 f"{result['decode_s']:.2f} s ({result['decode_tokens_per_s']:.1f} tokens/s, compile included)")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def _jsonl_prompt(line: str, name: str, number: int) -> str:
    from vffn_jax.config import ConfigError

    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--prompts {name} line {number}: not valid JSON ({e})") from None
    if isinstance(record, str):
        return record
    for key in ("prompt", "text"):
        if isinstance(record, dict) and isinstance(record.get(key), str):
            return record[key]
    raise ConfigError(f"--prompts {name} line {number}: expected a JSON string or an object with a \"prompt\" "
                      "(or \"text\") field")


def read_prompts(args) -> list[str]:
    from vffn_jax.config import ConfigError

    prompts = list(args.prompt)
    if args.prompts_file is not None:
        from vffn_jax import storage

        name = args.prompts_file
        try:
            path = storage.as_path(name)
            if not path.is_file():
                raise FileNotFoundError
            lines = [line.rstrip("\r") for line in path.read_bytes().decode("utf-8").split("\n")]
        except FileNotFoundError:
            raise FileNotFoundError(f"--prompts {name} not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts {name} is not UTF-8 text ({e})") from None
        lines = [line for line in lines if line.strip()]
        if name.endswith(".jsonl"):
            lines = [_jsonl_prompt(line, name, i) for i, line in enumerate(lines, start=1)]
        if not lines:
            raise ConfigError(f"--prompts {name} holds no prompt (it is empty or blank)")
        prompts += lines
    if not prompts:
        raise ConfigError("nothing to continue: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def run(args) -> tuple[dict, object]:
    from vffn_jax.infer import text as text_lib
    from vffn_jax.model import kv_cache
    from vffn_jax.model.config import loops_per_layer
    from vffn_jax.checkpoint import restore
    from vffn_jax.infer import sampling
    from vffn_jax.config import ConfigError, DEPTH_KINDS
    from vffn_jax.data.tokenizer import check_model_fits, load_tokenizer

    s_cfg = sampling.validate(sampling.SamplingConfig(args.temperature, args.top_k, args.top_p))
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be >= 1")
    prompts = read_prompts(args)
    from vffn_jax.config import parse_set_args

    restored = restore.restore_params(args.workdir, args.step, overrides=parse_set_args(args.overrides))
    cfg, m = restored.cfg, restored.cfg.model
    tok = load_tokenizer(cfg.data.tokenizer)
    check_model_fits(tok, m, source=str(restored.workdir))
    context = cfg.train.seq_len
    encoded = text_lib.encode_prompts(tok, prompts, context=context, eos_prefix=not args.no_eos_prefix)
    gens, timings = text_lib.generate_in_batches(
        m, kv_cache.pure_params(restored.params), encoded, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, context=context, sampling_cfg=s_cfg, seed=args.seed,
        eos_id=None if args.ignore_eos else tok.eos_id, valid_vocab=tok.vocab_size, mesh=restored.setup.mesh)
    out = [text_lib.record(tok, text, g) for text, g in zip(prompts, gens)]
    prefill_s, decode_s, decode_tokens = timings["prefill_s"], timings["decode_s"], timings["decode_tokens"]
    notes = list(restored.notes)
    if m.ffn not in DEPTH_KINDS:
        notes.append(f"ffn={m.ffn} has no depth router: every token runs {loops_per_layer(m)} loop(s) per layer")
    result = {"workdir": str(restored.workdir), "step": restored.step, "scale": cfg.scale, "variant": cfg.variant,
              "ffn": m.ffn, "n_layers": m.n_layers,
              "max_depth": m.max_depth if m.ffn in DEPTH_KINDS else loops_per_layer(m),
              "context": context, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
              "sampling": {"temperature": s_cfg.temperature, "top_k": s_cfg.top_k, "top_p": s_cfg.top_p},
              "eos_prefix": not args.no_eos_prefix, "stop_at_eos": not args.ignore_eos,
              "prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens": decode_tokens,
              "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
              "generations": out, "notes": notes}
    return result, tok


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    runner.quiet_startup()
    from vffn_jax.parallel import distributed
    from vffn_jax import errors
    from vffn_jax.config import DEPTH_KINDS

    stdout = sys.stdout
    try:
        distributed.initialize(runner.distributed_args(args))
        import jax

        if jax.process_index() != 0:
            stdout = open(os.devnull, "w")
        result, tok = run(args)
    except Exception as e:  # bad input: `error: ...` and exit 2 or 3 (vffn_jax.errors); anything else is a bug
        return errors.report(e)
    if args.json:
        print(json.dumps(result, indent=1), file=stdout)
        return 0
    marks = args.depth_marks
    if marks == "auto":
        marks = "none" if result["ffn"] not in DEPTH_KINDS else ("color" if stdout.isatty() else "brackets")
    print(format_text(result, tok, marks), file=stdout)
    return 0


def console() -> None:
    """The `vffn-generate` console script (and `python generate.py`)."""
    runner.console(main)


if __name__ == "__main__":
    console()
