"""The forward-only evaluation step and the held-out loop: summed cross-entropy, token count and the routing
statistics of a batch (inference mode: each token's argmax depth, no Gumbel noise), averaged over batches.
Training's periodic eval and `eval.py` run the same memoised program."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vffn_jax.config import Config
from vffn_jax.model.stats import finish_stats, microbatch_stats, with_load_balance
from vffn_jax.parallel import sharding as shd
from vffn_jax.parallel.microbatch import scan_microbatches
from vffn_jax.parallel.program_cache import memoised, tree_key


def make_eval_step(graphdef, cfg: Config, mesh, param_shardings):
    """Inference-mode forward: summed CE, token count and the depth/expert statistics of one batch
    (in `train.grad_accum` microbatches, so evaluation fits wherever training does). Memoised as
    `make_train_step` is."""
    key = ("eval", graphdef, cfg.model, cfg.train, mesh, tree_key(param_shardings))
    return memoised(key, lambda: _build_eval_step(graphdef, cfg, mesh, param_shardings))


def _build_eval_step(graphdef, cfg: Config, mesh, param_shardings):

    def eval_fn(params, batch):
        def one(micro, _row_ids):
            inputs, targets = micro[:, :-1], micro[:, 1:]
            logits, aux = nnx.merge(graphdef, params)(inputs, train=False)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            stats = microbatch_stats(ce, aux, cfg.model.max_depth)
            if "executed_loops" in aux:  # FFN loops per token the inference program ran, per layer (model.depth_exec)
                stats["executed_depth"] = aux["executed_loops"]  # [layers]
            return (), stats

        n = math.gcd(cfg.train.grad_accum, batch.shape[0])  # an eval batch resized by eval_lib may not split
        _, stats = scan_microbatches(one, batch, n, init=())
        stats = finish_stats(stats)
        n_tokens = batch[:, 1:].size
        return {"ce_sum": stats.pop("loss") * n_tokens, "tokens": jnp.asarray(n_tokens, jnp.float32), **stats}

    return shd.on_mesh(jax.jit(eval_fn, in_shardings=(param_shardings, shd.batch_sharding(mesh)),
                               out_shardings=shd.replicated(mesh)), mesh)


def evaluate(eval_step, params, batches, mesh) -> dict[str, Any]:
    """Averages eval-step outputs over batches: loss, perplexity and the routing statistics."""
    totals: dict[str, Any] = {}
    n = 0
    for local in batches:
        out = jax.device_get(eval_step(params, shd.global_batch(local, mesh)))
        n += 1
        for k, v in out.items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    if n == 0:
        raise ValueError("no evaluation batches: the held-out split is empty")
    loss = float(totals.pop("ce_sum") / totals.pop("tokens"))
    result = {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0)))}
    for k, v in totals.items():
        v = v / n
        result[k] = v.tolist() if np.ndim(v) else float(v)
    return with_load_balance(result)


def window_summary(window: list[dict]) -> dict[str, Any]:
    """Mean over the logging window; per-layer arrays are kept as lists."""
    row = {}
    for key in window[0]:
        values = np.mean([np.asarray(m[key], np.float64) for m in window], axis=0)
        row[key] = values.tolist() if np.ndim(values) else float(values)
    row["loss_last"] = float(window[-1]["loss"])
    return with_load_balance(row)
