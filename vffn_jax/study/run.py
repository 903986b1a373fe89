"""Training one study run (or reusing it when finished) and collecting its numbers from its run directory."""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from vffn_jax.config import ConfigError
from vffn_jax.evals import summary
from vffn_jax.rundir import RunDir
from vffn_jax.study.plan import RunSpec

FLOP_KEYS = ("flops_per_token_inference", "flops_per_token_inference_executed", "flops_per_token_inference_paper",
             "paper_ffn_vs_dense")


# --------------------------------------------------------------------------- running and collecting


def is_finished(spec: RunSpec) -> bool:
    """Finished: a checkpoint at `steps`, the held-out loss logged at `steps`, and the same config."""
    from vffn_jax.checkpoint import manager as ckpt

    wd, run = spec.workdir, RunDir.at(spec.workdir)
    if not run.has_config() or run.final_eval(spec.cfg.train.steps) is None:
        return False
    if ckpt.all_steps(wd)[-1:] != [spec.cfg.train.steps]:
        return False
    saved = run.read_config_dict()
    if saved != json.loads(spec.cfg.to_json()):
        changed = sorted(f"{s}.{k}" for s in saved if isinstance(saved[s], dict)
                         for k in saved[s] if saved[s][k] != spec.cfg.to_dict().get(s, {}).get(k))
        raise ConfigError(f"{wd} holds a finished run with a different config ({', '.join(changed) or 'names'}); "
                          "use another --out, or delete that run directory to retrain it")
    return True


def run_one(spec: RunSpec, devices, log=print) -> dict[str, Any]:
    """Trains (or resumes, or skips when finished) one run; returns its collected numbers."""
    from vffn_jax.train import loop as trainer

    record = spec.workdir / "study_run.json"
    tag = f"{spec.regime}/{spec.variant}/seed{spec.seed}"
    if is_finished(spec):
        log(f"study: {tag}: finished, reusing {spec.workdir}")
    else:
        t0 = time.perf_counter()
        prev = json.loads(record.read_text()).get("wall_s", 0.0) if record.is_file() else 0.0
        trainer.train(spec.cfg, spec.workdir, devices=devices, progress=False)
        wall = prev + time.perf_counter() - t0
        record.write_text(json.dumps({"wall_s": wall, "steps": spec.cfg.train.steps}))
        log(f"study: {tag}: trained in {wall:.1f} s")
    result = collect(spec)
    log(f"study: {tag}: held-out loss {result['loss']:.4f}, {result['tokens_per_sec']:,.0f} tokens/s"
        + (f", mean depth {result['mean_depth']:.2f}" if result.get("mean_depth") is not None else ""))
    return result


def collect(spec: RunSpec) -> dict[str, Any]:
    """The numbers of one finished run, from its metrics.jsonl and config."""
    from vffn_jax.perf import flops as flops_lib

    cfg, m = spec.cfg, spec.cfg.model
    rows = RunDir.at(spec.workdir).metrics()
    final = RunDir.at(spec.workdir).final_eval(cfg.train.steps)
    if final is None:
        raise RuntimeError(f"{spec.workdir}: no held-out loss at step {cfg.train.steps} in metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r and "tokens_per_sec" in r]
    tps = [r["tokens_per_sec"] for r in train_rows]
    record = spec.workdir / "study_run.json"
    routing = summary.routing_summary(m, cfg.train.seq_len, summary.from_metrics_row(final))
    mean_depth = routing.get("mean_depth")
    loops = mean_depth if mean_depth is not None else (m.n_loops if m.ffn == "kloop" else 1)
    return {
        "regime": spec.regime, "variant": spec.variant, "ffn": m.ffn, "seed": spec.seed,
        "workdir": str(spec.workdir), "steps": cfg.train.steps,
        "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
        "loss": float(final["eval/loss"]), "perplexity": float(final["eval/perplexity"]),
        "final_train_loss": float(train_rows[-1]["loss"]) if train_rows else None,
        "params_total": flops_lib.analytic_params(m),
        "params_non_embedding": flops_lib.analytic_params(m) - 2 * m.vocab_size * m.d_model,
        "flops_per_token_train": flops_lib.flops_per_token(m, cfg.train.seq_len, train=True),
        **{k: routing[k] for k in FLOP_KEYS},  # ideal (flops_per_token_inference), executed, paper
        "executed_depth": routing["inference_depth_executed"],
        # median over logging windows: robust to the first window, which includes compilation
        "tokens_per_sec": float(np.median(tps)) if tps else float("nan"),
        "mean_loops": float(loops), "mean_depth": mean_depth, "mean_depth_per_layer": routing.get("mean_depth_per_layer"),
        "mean_alpha": final.get("eval/mean_alpha"),
        "curve": [[r["step"], r["loss"]] for r in train_rows],
        "wall_s": json.loads(record.read_text()).get("wall_s") if record.is_file() else None,
        "init_from": cfg.train.init_from or None,
    }
