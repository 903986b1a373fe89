"""Causal self-attention kernels and document masking (`model.attention`, `model.doc_mask`).

Kernels (all take q as `[B, T, N, H]`, k and v as `[B, T, K, H]` and return `[B, T, N, H]`; K divides N, and with
grouped-query attention (K < N) key/value head j serves query heads j*N/K .. (j+1)*N/K - 1, as in transformers' Llama):

* `xla`: `jax.nn.dot_product_attention(implementation="xla")`, the reference path and the one for CPUs.
* `splash`: JAX's Pallas TPU flash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), run per
  shard under `shard_map`: batch split over the mesh axes of `act_batch` (data, fsdp), heads over those
  of `act_heads` (tensor), each device runs the kernel on its own sequences and heads with no
  communication. Off TPU (CPU tests) the same kernel runs in Pallas interpret mode.
* `cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`
  (bf16/fp16 only).
* `auto`: splash on TPU, cuDNN on GPU (when the compute dtype is bf16/fp16), XLA elsewhere, decided at
  trace time from the devices of the mesh the step is compiled for (a TPU pre-flight traces for TPU
  devices on a CPU host), not from the default backend.

Document masking: `segment_ids(tokens, eos_id)` numbers the documents of a packed row (a token's segment is
the number of EOS tokens strictly before it, so an EOS belongs to the document it ends); with segment
ids a query attends only to earlier keys of its own document. Every kernel gets the same mask: splash
as `SegmentIds`, XLA and cuDNN as a boolean `[B, 1, T, T]` mask (cuDNN's JAX API has no segment ids; JAX
turns the mask into an additive bias there). RoPE positions are *not* restarted per document: RoPE
scores depend only on the offset between query and key, and within one document that offset is the
same whether positions restart or not, so a restart would change nothing but rounding.
"""
from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp

from vffn_jax.parallel.sharding import logical_to_spec

KINDS = ("auto", "xla", "splash", "cudnn")
SPLASH_BLOCKS = (512, 256, 128)  # splash tile size: the largest of these dividing T (the kernel needs T % 128 == 0)
_NOTICED: set[str] = set()


def segment_ids(tokens_bt, eos_id: int):
    """`[B, T]` int32 document index of each token: the number of EOS tokens strictly before it."""
    is_eos = (tokens_bt == eos_id).astype(jnp.int32)
    return jnp.cumsum(is_eos, axis=1) - is_eos


def _notice(text: str) -> None:
    """One line on stderr (process 0), once per message per process: kernels are chosen at trace time."""
    if text not in _NOTICED:
        _NOTICED.add(text)
        if jax.process_index() == 0:
            print(f"vffn_jax: {text}", file=sys.stderr, flush=True)


def platform() -> str:
    """The platform the current computation is compiled for: the ambient mesh's devices, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        device = getattr(mesh, "abstract_device", None)
        if device is not None and getattr(device, "platform", None):
            return device.platform
        try:
            return jax.sharding.get_mesh().devices.flat[0].platform
        except Exception:  # no concrete mesh in context
            pass
    return jax.devices()[0].platform


def resolve(kind: str, dtype, seq_len: int, *, platform_name: str | None = None) -> str:
    """The kernel `kind` (one of KINDS) runs as for this platform, dtype and length: `xla`, `splash` or `cudnn`."""
    if kind not in KINDS:
        raise ValueError(f"model.attention={kind!r}: choose one of {KINDS}")
    asked = kind
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if kind == "auto":
        plat = platform_name or platform()
        kind = "splash" if plat == "tpu" else "cudnn" if plat in ("gpu", "cuda") else "xla"
        if kind == "cudnn" and not low_precision:
            _notice(f"model.attention=auto: cuDNN flash attention needs bfloat16/float16, the compute dtype is "
                    f"{jnp.dtype(dtype).name}; using XLA attention")
            return "xla"
    if kind == "cudnn" and not low_precision:
        raise ValueError(f"model.attention=cudnn needs model.dtype bfloat16 or float16, got {jnp.dtype(dtype).name}")
    if kind == "splash" and seq_len % SPLASH_BLOCKS[-1]:  # e.g. a downstream-eval batch; train.seq_len is validated
        _notice(f"model.attention={asked}: sequence length {seq_len} is not a multiple of 128 (the splash kernel's "
                "smallest tile); using XLA attention for it")
        return "xla"
    return kind


def attend(q, k, v, seg=None, *, kind: str = "auto", interpret: bool | None = None):
    """Causal attention of `[B, T, N, H]` q/k/v, scaled by 1/sqrt(H), restricted to equal `seg` ([B, T])
    when given. `interpret` forces splash's Pallas interpret mode (default: whenever not on TPU)."""
    impl = resolve(kind, q.dtype, q.shape[1])
    if impl == "splash":
        return splash_attention(q, k, v, seg, interpret=interpret)
    mask = None if seg is None else document_mask(seg)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl)


def document_mask(seg):
    """`[B, 1, T, T]` bool: query and key in the same document (causality is added by the kernel)."""
    return (seg[:, :, None] == seg[:, None, :])[:, None]


# --------------------------------------------------------------------------- splash


def splash_block(seq_len: int) -> int:
    """The largest of SPLASH_BLOCKS dividing `seq_len` (a multiple of 128)."""
    return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), seq_len)


def _splash_kernel(seq_len: int, n_heads: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(n_heads)])
    b = min(block, seq_len)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # built per trace (not cached): its mask tables become constants of the computation being traced
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q_bnth, k_bnth, v_bnth, seg_bt=None, *, block: int, interpret: bool):
    """The kernel on one device's sequences and heads (`[b, n, T, H]`), vmapped over the batch."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, n, t, _ = q_bnth.shape
    kernel = _splash_kernel(t, n, block, interpret)
    if seg_bt is None:
        return jax.vmap(kernel)(q_bnth, k_bnth, v_bnth)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
        q_bnth, k_bnth, v_bnth, seg_bt)


def splash_attention(q, k, v, seg=None, *, interpret: bool | None = None, block: int | None = None):
    """Splash attention of `[B, T, N, H]` q/k/v: under `shard_map` over the ambient mesh (batch over the
    `act_batch` mesh axes, heads over `act_heads`), or directly without a mesh."""
    if interpret is None:
        interpret = platform() != "tpu"
    _, t, n, h = q.shape
    if k.shape[2] != n:  # grouped-query attention: each key/value head serves n / K consecutive query heads
        k, v = (jnp.repeat(a, n // a.shape[2], axis=2) for a in (k, v))
    block = block or splash_block(t)
    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)  # the kernel does not scale the logits
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, N, T, H]: heads before the sequence
    seg = None if seg is None else seg.astype(jnp.int32)
    args = (q, k, v) if seg is None else (q, k, v, seg)
    local = functools.partial(_splash_local, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(*args)
    else:
        qkv_spec = logical_to_spec(("act_batch", "act_heads", "act_seq", None))
        if qkv_spec[2] is not None:
            raise NotImplementedError("splash attention with a sequence-sharded activation (act_seq) is not supported")
        specs = (qkv_spec,) * 3 + (() if seg is None else (logical_to_spec(("act_batch", "act_seq")),))
        out = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(*args)
    return jnp.swapaxes(out, 1, 2)

