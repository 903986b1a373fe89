"""TPU pre-flight on any host: compile the real training step ahead of time for a TPU topology.

`jax.experimental.topologies` describes a pod slice (e.g. `v5p:4x4x4`: 64 chips on 16 hosts)
without the hardware; with `libtpu` installed (`pip install -r requirements-tpu.txt`) XLA compiles
the sharded train step for it on a CPU-only machine and reports per-device memory. That answers
"does this config, mesh and batch fit?" before a pod is reserved.
"""
from __future__ import annotations

import os
import re
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vffn_jax import checkpoint as ckpt
from vffn_jax import sharding as shd
from vffn_jax import train_lib
from vffn_jax.config import Config, ConfigError

GiB = 1024 ** 3
# HBM per chip, keyed by a substring of `device_kind` (lower case); most specific first.
HBM_BYTES = {
    "tpu v5 lite": 16 * GiB,  # v5e
    "tpu v5e": 16 * GiB,
    "tpu v5p": 95 * GiB,
    "tpu v5": 95 * GiB,  # v5p reports "TPU v5"
    "tpu v6 lite": 32 * GiB,  # v6e (Trillium)
    "tpu v6": 32 * GiB,
    "tpu v4": 32 * GiB,
    "h200": 141e9,
    "h100": 80e9,
    "a100": 80e9,
}


def hbm_bytes(device_kind: str) -> int | None:
    kind = device_kind.lower()
    return next((int(v) for k, v in HBM_BYTES.items() if k in kind), None)


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as `v5p:4x4x4`, `v5e:16x16` or `v4:2x2x2`."""
    # libtpu takes /tmp/libtpu_lockfile per process; describing a topology uses no TPU, so don't contend for it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # no libtpu, or a name libtpu does not know
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"--topology {name!r}: cannot describe this TPU topology ({msg}). Pre-flight needs libtpu "
            "(`pip install -r requirements-tpu.txt`) and a name like v5p:4x4x4, v5e:16x16 or v4:2x2x2") from None


def compile_train_step(cfg: Config, devices) -> dict[str, Any]:
    """AOT-compiles the training step on `devices` (real or a topology's) and returns its memory per device."""
    s = train_lib.setup(cfg, devices)
    tx = train_lib.make_optimizer(cfg.train)
    abstract_opt, opt_shardings = train_lib.opt_state_shardings(tx, s)
    step = train_lib.make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_shardings)
    params = ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings)
    opt_state = ckpt.abstract_with_shardings(abstract_opt, opt_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=shd.batch_sharding(s.mesh))
    step_no = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(s.mesh))
    kind = s.mesh.devices.flat[0].device_kind
    hbm = hbm_bytes(kind)
    lowered = step.lower(params, opt_state, batch, step_no)
    try:
        mem = lowered.compile().memory_analysis()
    except Exception as e:  # the TPU compiler refuses a program that cannot fit, naming what it needed
        oom = _HBM_OOM.search(str(e))
        if oom is None:
            raise
        temp, hbm = _bytes(*oom.group(1, 2)), _bytes(*oom.group(3, 4))
        args = sum(_nbytes_per_device(x) for x in jax.tree.leaves((params, opt_state, batch)))
        mem = types.SimpleNamespace(argument_size_in_bytes=args, output_size_in_bytes=0, alias_size_in_bytes=0,
                                    temp_size_in_bytes=temp, generated_code_size_in_bytes=0)
    args, out, alias = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes
    temp, code = mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
    total = args + out - alias + temp + code  # donated params/opt state alias their outputs
    return {
        "device_kind": kind,
        "devices": int(s.mesh.devices.size),
        "processes": len({d.process_index for d in s.mesh.devices.flat}),
        "mesh": dict(zip(s.mesh.axis_names, (int(x) for x in s.mesh.devices.shape))),
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "argument_bytes": int(args),
        "output_bytes": int(out),
        "alias_bytes": int(alias),
        "temp_bytes": int(temp),
        "code_bytes": int(code),
        "per_device_bytes": int(total),
        "hbm_bytes": hbm,
        "fits": None if hbm is None else bool(total <= hbm),
    }


# XLA:TPU's compile-time OOM: "... HLO temporaries (157.22G) exceeds available HBM (15.75G)"
_HBM_OOM = re.compile(r"temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def _nbytes_per_device(x: jax.ShapeDtypeStruct) -> int:
    return int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize


def format_report(r: dict[str, Any]) -> str:
    gib = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    hbm = "unknown" if r["hbm_bytes"] is None else gib(r["hbm_bytes"]).strip()
    verdict = {True: "fits", False: "DOES NOT FIT", None: "fit unknown (no HBM figure for this chip)"}[r["fits"]]
    return "\n".join([
        f"pre-flight: train step compiled for {r['devices']} x {r['device_kind']} ({r['processes']} hosts), "
        f"mesh {r['mesh']}, batch {r['batch_size']} x {r['seq_len']}",
        f"  arguments   {gib(r['argument_bytes'])}  (params, optimizer state, batch; per device)",
        f"  temporaries {gib(r['temp_bytes'])}  (activations, gradients, collectives)",
        f"  outputs     {gib(r['output_bytes'] - r['alias_bytes'])}  (not aliased to donated inputs)",
        f"  total       {gib(r['per_device_bytes'])}  of {hbm} HBM per chip: {verdict}",
    ])
