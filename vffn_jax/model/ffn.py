"""Pure FFN math over params dicts: dense SwiGLU, K-loop, MoE, and VersatileFFN (docs/method.md).

Every function takes `x [..., d]`, the residual stream after attention, and returns
`(y [..., d], aux)` where `y` is the new residual stream: the FFN's residual is part of one loop,
`FFN(z) = z + act(z) W_down`. Param keys: `norm_scale [d]`, `w_gate [d,f]`, `w_up [d,f]`,
`w_down [f,d]`, plus `expert_router [d,E]` and/or `depth_router [d,L]` where the variant routes,
and for `moe` the stacked real experts `expert_w_gate/expert_w_up [E,d,f/E]`, `expert_w_down [E,f/E,d]`.

`train=True` is the training forward (straight-through Gumbel depth, all L loops weighted); `train=False`
is the inference FFN, run alike by the eval forward and the KV-cache decoder (`infer/decode.py`): each
token runs its own `argmax(depth_logits) + 1` loops in one while_loop that stops at the deepest token
(`depth_infer`), tokens marked inactive (`active=`, padding and finished decode rows) get depth 1, and
VersatileFFN skips its width path when it would add exactly 0 (every active token at depth L).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vffn_jax.model import depth_compact

Params = dict[str, jax.Array]
Aux = dict[str, jax.Array]


def rms_norm(x, scale, eps: float = 1e-6):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def _cast(params: Params, dtype) -> Params:
    if dtype is None:
        return params
    return {k: v.astype(dtype) for k, v in params.items()}


def swiglu_hidden(params: Params, z, eps: float = 1e-6):
    """`act(z) = silu(n W_gate) * (n W_up)` with `n = norm(z)`: the hidden activation `[..., f]`."""
    n = rms_norm(z, params["norm_scale"], eps)
    return jax.nn.silu(n @ params["w_gate"]) * (n @ params["w_up"])


def ffn_loop(params: Params, z, eps: float = 1e-6):
    """One full loop with its residual: `FFN(z) = z + act(z) W_down`."""
    return z + swiglu_hidden(params, z, eps) @ params["w_down"]


# --------------------------------------------------------------------------- baselines


def dense_ffn(params: Params, x, *, dtype=None, eps: float = 1e-6, **_) -> tuple[jax.Array, Aux]:
    return ffn_loop(_cast(params, dtype or x.dtype), x, eps), {}


def kloop_ffn(params: Params, x, *, n_loops: int, dtype=None, eps: float = 1e-6, **_) -> tuple[jax.Array, Aux]:
    """The dense FFN applied K times, `x <- FFN(x)` (docs/method.md kloop-K)."""
    p = _cast(params, dtype or x.dtype)
    y, _ = jax.lax.scan(lambda z, _: (ffn_loop(p, z, eps), None), x, None, length=n_loops)
    return y, {}


# --------------------------------------------------------------------------- width path


def expert_gates(expert_logits, top_k: int):
    """Top-k over the E logits, softmax over the selected ones only; returns dense gates `[..., E]` and indices."""
    top_logits, top_idx = jax.lax.top_k(expert_logits, top_k)
    weights = jax.nn.softmax(top_logits, axis=-1)
    gates = jnp.sum(jax.nn.one_hot(top_idx, expert_logits.shape[-1], dtype=weights.dtype) * weights[..., None], axis=-2)
    return gates, top_idx


def width_from_hidden(params: Params, x, hidden, gates):
    """`x + (m * act(x)) W_down`, where the mask `m` holds each expert's gate on its slice of units.

    Equal to `sum_j w_j FFN_{idx_j}(x)` because the gates sum to 1 and slices are disjoint (docs/method.md).
    """
    n_experts = gates.shape[-1]
    f = hidden.shape[-1]
    hidden_e = hidden.reshape(*hidden.shape[:-1], n_experts, f // n_experts)
    masked = (hidden_e * gates[..., None].astype(hidden.dtype)).reshape(hidden.shape)
    return x + masked @ params["w_down"]


def router_stats(expert_logits, top_idx, n_experts: int) -> Aux:
    """Switch balance loss `E * sum_i f_i P_i`, z-loss, expert load and router entropy (f32)."""
    logits = expert_logits.astype(jnp.float32).reshape(-1, n_experts)
    probs = jax.nn.softmax(logits, axis=-1)
    slots = jax.nn.one_hot(top_idx.reshape(-1), n_experts, dtype=jnp.float32)
    load = jnp.mean(slots, axis=0)  # f_i: fraction of token-slots routed to expert i
    mean_prob = jnp.mean(probs, axis=0)  # P_i
    return {
        "balance_loss": n_experts * jnp.sum(jax.lax.stop_gradient(load) * mean_prob),
        "z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
        "expert_load": load,
        "router_prob": mean_prob,  # P_i: with expert_load, forms the exact balance loss of a split batch
        "router_entropy": jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1)),
    }


def width_ffn(params: Params, x, *, n_experts: int, top_k: int, dtype=None, eps: float = 1e-6, **_):
    """Width-only ablation, the k-slices reading: virtual experts only (VersatileFFN's width path, alpha = 1).

    `y = x + (m * act(x)) W_down`: each token uses the k/E of the hidden units its router picked, so this
    is a strict sub-network of the dense FFN (see `width_shared_ffn` for the paper's width sweep)."""
    p = _cast(params, dtype or x.dtype)
    expert_logits = x.astype(jnp.float32) @ params["expert_router"].astype(jnp.float32)
    gates, top_idx = expert_gates(expert_logits, top_k)
    y = width_from_hidden(p, x, swiglu_hidden(p, x, eps), gates)
    return y, router_stats(expert_logits, top_idx, n_experts)


def width_shared_ffn(params: Params, x, *, n_experts: int, top_k: int, dtype=None, eps: float = 1e-6, **_):
    """The paper's width ablation (docs/method.md width-shared): one shared expert plus the top-k routed virtual experts.

    The paper's width sweep "maintained one shared expert for the width-versatile pathway, while disabling
    virtual experts within the depth-versatile pathway". Our reading: the shared expert is the full FFN
    (every hidden unit, applied to every token, as the dense FFN is the always-on part of the paper's MoE
    baseline), and the routed experts are the usual virtual experts, slices of that same FFN:

        y = x + act(x) W_down + sum_j w_j act(x)[S_idx_j] W_down[S_idx_j]
          = x + ((1 + m) * act(x)) W_down

    with `w = softmax` over the k selected router logits and `m` the gate mask of `width_from_hidden`. The
    second line is what runs: the routed experts reuse the shared expert's hidden activation, so the cost is
    one dense FFN (a single down-projection of the rescaled hidden units) plus the router. Same router
    (`x W_er`, no bias), balance/z losses and statistics as `width_ffn`. It equals VersatileFFN with the
    depth path cut to its first loop and the two paths summed instead of gated.
    """
    p = _cast(params, dtype or x.dtype)
    expert_logits = x.astype(jnp.float32) @ params["expert_router"].astype(jnp.float32)
    gates, top_idx = expert_gates(expert_logits, top_k)
    y = width_from_hidden(p, x, swiglu_hidden(p, x, eps), 1 + gates)  # shared (1 on every unit) + routed (gates)
    return y, router_stats(expert_logits, top_idx, n_experts)


# --------------------------------------------------------------------------- depth path


def gumbel_noise(rng, shape, row_ids=None):
    """Standard Gumbel noise `[R, ...]` whose row r is drawn from its own key `fold_in(rng, row_ids[r])`.

    A token's noise is then a function of (rng, its global row index, its position in the row) only, not
    of the other rows in the array: a microbatch given its rows' global indices (`row_ids`, default
    `0..R-1`) gets exactly the noise those rows get in the whole batch (gradient accumulation,
    `train.grad_accum`), on any mesh. Each row is an ordinary `jax.random.gumbel` draw, so the
    distribution is exactly Gumbel(0, 1) and rows are independent.
    """
    if len(shape) < 2:
        return jax.random.gumbel(rng, shape, jnp.float32)
    if row_ids is None:
        row_ids = jnp.arange(shape[0], dtype=jnp.int32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, row_ids)
    return jax.vmap(lambda k: jax.random.gumbel(k, tuple(shape[1:]), jnp.float32))(keys)


def straight_through_gumbel(logits, tau, rng, row_ids=None):
    """Hard one-hot forward, gradient of `softmax((logits + G) / tau)` (docs/method.md training).

    `G = gumbel_noise(rng, logits.shape, row_ids)`: the leading axis of `logits` is the batch row."""
    gumbel = gumbel_noise(rng, logits.shape, row_ids)
    soft = jax.nn.softmax((logits + gumbel) / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return hard + (soft - jax.lax.stop_gradient(soft))  # exactly `hard` in the forward pass


def depth_train(p: Params, y1, loop_weights, *, eps: float, remat_loops: bool):
    """`sum_l g_l y_l` over all L loops, accumulated in the scan carry (no stack of L outputs)."""
    step = lambda z: ffn_loop(p, z, eps)
    if remat_loops:
        step = jax.checkpoint(step)

    def body(carry, g_l):
        y, acc = carry
        y = step(y)
        return (y, acc + g_l[..., None].astype(y.dtype) * y), None

    acc = loop_weights[..., 0, None].astype(y1.dtype) * y1
    rest = jnp.moveaxis(loop_weights[..., 1:], -1, 0)
    (_, acc), _ = jax.lax.scan(body, (y1, acc), rest, unroll=True)
    return acc


def depth_infer(p: Params, y1, depth, *, eps: float):
    """`y_depth` per token with a while_loop that stops at the batch's deepest token (inference only)."""
    deepest = jnp.max(depth)

    def cond(state):
        return state[0] < deepest

    def body(state):
        loop, y = state
        new = ffn_loop(p, y, eps)
        return loop + 1, jnp.where((loop + 1 <= depth)[..., None], new, y)

    _, y = jax.lax.while_loop(cond, body, (jnp.asarray(1, depth.dtype), y1))
    return y


def depth_choice(depth_logits, *, train: bool, tau, rng, row_ids=None):
    """Loop weights `g [..., L]` (straight-through in training) and the chosen depth 1..L per token."""
    max_depth = depth_logits.shape[-1]
    if train:
        if rng is None:
            raise ValueError("train=True needs an rng for the Gumbel noise of the depth router")
        g = straight_through_gumbel(depth_logits, tau, rng, row_ids)
    else:
        g = jax.nn.one_hot(jnp.argmax(depth_logits, axis=-1), max_depth, dtype=jnp.float32)
    depth = jnp.argmax(g, axis=-1).astype(jnp.int32) + 1
    return g, depth


def _depth_and_alpha(p, x, hidden, depth_logits, *, train, tau, rng, eps, remat_loops, row_ids=None, active=None,
                     depth_exec="masked", depth_block=64):
    max_depth = depth_logits.shape[-1]
    g, depth = depth_choice(depth_logits, train=train, tau=tau, rng=rng, row_ids=row_ids)
    y1 = x + hidden @ p["w_down"]
    if train:
        if active is not None:
            raise ValueError("active= is for inference (train=False) only")
        x_depth = depth_train(p, y1, g, eps=eps, remat_loops=remat_loops)
        expected_loops = jnp.sum(g * jnp.arange(1, max_depth + 1, dtype=g.dtype), axis=-1)
    else:
        if active is not None:  # padding / finished rows: depth 1, so they never extend the while_loop
            depth = jnp.where(active, depth, 1)
        if depth_exec == "masked":
            x_depth, executed = depth_infer(p, y1, depth, eps=eps), jnp.max(depth).astype(jnp.float32)
        else:  # compact (model.depth_exec auto/compact): each loop runs only on the tokens that need it
            x_depth, executed = depth_compact.compact_depth(p, y1, depth, eps=eps, depth_block=depth_block,
                                                            max_depth=max_depth, loop_fn=ffn_loop)
        expected_loops = depth.astype(jnp.float32)
    alpha = (max_depth - expected_loops) / max_depth  # the depth router's second gradient path
    aux = {"depth": depth, "alpha": alpha,
           "depth_entropy": jnp.mean(-jnp.sum(jax.nn.softmax(depth_logits) * jax.nn.log_softmax(depth_logits), -1))}
    if not train:  # FFN loops per token the inference program ran (loop 1 included): the cost, beside each own depth
        aux["executed_loops"] = executed
    return x_depth, alpha, aux


def depth_ffn(params: Params, x, *, max_depth: int, train: bool = False, tau=1.0, rng=None, row_ids=None,
              active=None, dtype=None, eps: float = 1e-6, remat_loops: bool = False, depth_exec: str = "masked",
              depth_block: int = 64, **_):
    """Depth-only ablation: learned per-token loop count, no width path (alpha forced to 0).

    Inference (`train=False`) runs each token `argmax(depth_logits) + 1` loops in one while_loop that stops
    at the deepest token; `active [...]` (bool, like `x` without its last axis) marks the tokens that count:
    the others (padding, finished rows of a decode batch) get depth 1 and so never extend the loop."""
    p = _cast(params, dtype or x.dtype)
    depth_logits = x.astype(jnp.float32) @ params["depth_router"].astype(jnp.float32)
    assert depth_logits.shape[-1] == max_depth, (depth_logits.shape, max_depth)
    x_depth, _, aux = _depth_and_alpha(p, x, swiglu_hidden(p, x, eps), depth_logits, train=train, tau=tau,
                                       rng=rng, eps=eps, remat_loops=remat_loops, row_ids=row_ids, active=active,
                                       depth_exec=depth_exec, depth_block=depth_block)
    aux["alpha"] = jnp.zeros_like(aux["alpha"])
    return x_depth, aux


# --------------------------------------------------------------------------- VersatileFFN


def versatile_ffn(params: Params, x, *, n_experts: int, top_k: int, max_depth: int, train: bool = False,
                  tau=1.0, rng=None, row_ids=None, active=None, dtype=None, eps: float = 1e-6,
                  remat_loops: bool = False, fixed_alpha: float | None = None, depth_exec: str = "masked",
                  depth_block: int = 64, **_):
    """VersatileFFN (docs/method.md): `(1 - alpha) * x_depth + alpha * x_width`, alpha from the token's depth.

    The width path reuses loop 1's hidden activation, so it costs one extra down-projection; at inference
    (`train=False`) it is skipped when every token (every `active` one, see `depth_ffn`) runs all L loops,
    where alpha = 0 and it would add exactly 0. `fixed_alpha` replaces the difficulty-aware gate by a
    constant (the `versatile_avg` ablation); the depth router still picks each token's depth, and then gets
    gradient through `g` only.
    aux: `depth [...] int32` (1..L), `alpha [...]` (the gate actually used), `expert_load [E]`,
    `router_prob [E]`, `balance_loss`, `z_loss`, `router_entropy`, `depth_entropy`.
    """
    if params["expert_router"].shape[-1] != n_experts or params["depth_router"].shape[-1] != max_depth:
        raise ValueError(f"router shapes {params['expert_router'].shape}, {params['depth_router'].shape} "
                         f"do not match n_experts={n_experts}, max_depth={max_depth}")
    p = _cast(params, dtype or x.dtype)
    x32 = x.astype(jnp.float32)
    expert_logits = x32 @ params["expert_router"].astype(jnp.float32)
    depth_logits = x32 @ params["depth_router"].astype(jnp.float32)
    hidden = swiglu_hidden(p, x, eps)

    gates, top_idx = expert_gates(expert_logits, top_k)
    x_depth, alpha, aux = _depth_and_alpha(p, x, hidden, depth_logits, train=train, tau=tau, rng=rng,
                                           eps=eps, remat_loops=remat_loops, row_ids=row_ids, active=active,
                                           depth_exec=depth_exec, depth_block=depth_block)
    if fixed_alpha is not None:
        alpha = aux["alpha"] = jnp.full_like(alpha, fixed_alpha)
    a = alpha[..., None].astype(x.dtype)

    def fuse():
        return (1 - a) * x_depth + a * width_from_hidden(p, x, hidden, gates)

    if train or fixed_alpha is not None:
        y = fuse()
    else:
        needed = alpha > 0 if active is None else (alpha > 0) & active
        y = jax.lax.cond(jnp.any(needed), fuse, lambda: x_depth)
    return y, {**aux, **router_stats(expert_logits, top_idx, n_experts)}


def versatile_avg_ffn(params: Params, x, **kwargs):
    """Ablation (paper Table 3, docs/method.md): both paths averaged 0.5/0.5 instead of the difficulty-aware gate."""
    return versatile_ffn(params, x, fixed_alpha=0.5, **kwargs)


# --------------------------------------------------------------------------- MoE baseline


def moe_ffn(params: Params, x, *, n_experts: int, top_k: int, dtype=None, eps: float = 1e-6, **_):
    """The paper's MoE baseline (docs/method.md): the dense SwiGLU kept plus E real SwiGLU experts of width f/E.

    `y = x + act(x) W_down + sum_j w_j act_{idx_j}(x) W_down^{idx_j}`: one residual, like one loop of
    the FFN (because the top-k weights sum to 1 this equals `sum_j w_j (FFN(x) + expert_{idx_j}(x))`).
    The experts share the FFN's norm; the router reads `x` like the width router, top-k then softmax
    over the selected logits, the same balance/z losses and statistics. Dense dispatch: every expert
    runs on every token as one einsum over the stacked `[E, d, f/E]` weights, weighted by the gates
    (0 for unselected experts), so no gather/scatter or ragged shapes.
    """
    p = _cast(params, dtype or x.dtype)
    expert_logits = x.astype(jnp.float32) @ params["expert_router"].astype(jnp.float32)
    gates, top_idx = expert_gates(expert_logits, top_k)
    n = rms_norm(x, p["norm_scale"], eps)
    dense_out = (jax.nn.silu(n @ p["w_gate"]) * (n @ p["w_up"])) @ p["w_down"]
    hidden = (jax.nn.silu(jnp.einsum("...d,edh->...eh", n, p["expert_w_gate"]))
              * jnp.einsum("...d,edh->...eh", n, p["expert_w_up"]))
    hidden = hidden * gates[..., None].astype(hidden.dtype)
    expert_out = jnp.einsum("...eh,ehd->...d", hidden, p["expert_w_down"])
    return x + dense_out + expert_out, router_stats(expert_logits, top_idx, n_experts)


# --------------------------------------------------------------------------- registry


def param_shapes(kind: str, d: int, f: int, n_experts: int, max_depth: int) -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Parameter name -> (shape, logical axis names) for an FFN kind."""
    shapes = {
        "norm_scale": ((d,), ("embed",)),
        "w_gate": ((d, f), ("embed", "mlp")),
        "w_up": ((d, f), ("embed", "mlp")),
        "w_down": ((f, d), ("mlp", "embed")),
    }
    if kind in ("width_only", "width_shared", "versatile", "versatile_avg", "moe"):
        shapes["expert_router"] = ((d, n_experts), ("embed", None))
    if kind in ("depth_only", "versatile", "versatile_avg"):
        shapes["depth_router"] = ((d, max_depth), ("embed", None))
    if kind == "moe":  # E real experts of width f/E, stacked: shard like the dense FFN (d on fsdp, hidden on tensor)
        shapes["expert_w_gate"] = ((n_experts, d, f // n_experts), ("expert", "embed", "mlp"))
        shapes["expert_w_up"] = ((n_experts, d, f // n_experts), ("expert", "embed", "mlp"))
        shapes["expert_w_down"] = ((n_experts, f // n_experts, d), ("expert", "mlp", "embed"))
    return shapes


FFN_FUNCTIONS: dict[str, Callable[..., tuple[jax.Array, Aux]]] = {
    "dense": dense_ffn,
    "kloop": kloop_ffn,
    "width_only": width_ffn,
    "width_shared": width_shared_ffn,
    "depth_only": depth_ffn,
    "versatile": versatile_ffn,
    "versatile_avg": versatile_avg_ffn,
    "moe": moe_ffn,
}


def apply_ffn(kind: str, params: Params, x, **kwargs: Any) -> tuple[jax.Array, Aux]:
    return FFN_FUNCTIONS[kind](params, x, **kwargs)
