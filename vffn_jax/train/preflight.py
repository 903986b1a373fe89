"""TPU pre-flight on any host: compile the real training step ahead of time for a TPU topology.

`jax.experimental.topologies` describes a pod slice (e.g. `v5p:4x4x4`: 64 chips on 16 hosts)
without the hardware; with `libtpu` installed (`pip install -r requirements-tpu.txt`) XLA compiles
the sharded train step for it on a CPU-only machine and reports per-device memory. That answers
"does this config, mesh and batch fit?" before a pod is reserved.
"""
from __future__ import annotations

import collections
import copy
import os
import re
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.parallel import sharding as shd
from vffn_jax.model import placement
from vffn_jax.train import optimizer
from vffn_jax.train import step as step_lib
from vffn_jax.config import Config, ConfigError
from vffn_jax.perf.chips import GiB, chip_for


def hbm_bytes(device_kind: str) -> int | None:
    chip = chip_for(device_kind)
    return None if chip is None else chip.hbm_bytes


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


_REPORTS: collections.OrderedDict = collections.OrderedDict()  # program key -> report, least recently used first
_REPORTS_KEPT = 32


def compile_train_step(cfg: Config, devices) -> dict[str, Any]:
    """AOT-compiles the training step on `devices` (real or a topology's) and returns its memory per device.

    Memoised on what determines the program (the model, train and mesh sections and the devices): a sweep
    candidate equal to the run's own config (e.g. `model.remat=none` when the run has it) is compiled once.
    Each call returns its own copy of the report."""
    key = (cfg.model, cfg.train, cfg.mesh, tuple(devices))
    if key in _REPORTS:
        _REPORTS.move_to_end(key)
    else:
        _REPORTS[key] = _compile_train_step(cfg, devices)
        while len(_REPORTS) > _REPORTS_KEPT:
            _REPORTS.popitem(last=False)
    return copy.deepcopy(_REPORTS[key])


def _compile_train_step(cfg: Config, devices) -> dict[str, Any]:
    s = placement.setup(cfg, devices)
    tx = optimizer.make_optimizer(cfg.train)
    abstract_opt, opt_shardings = optimizer.opt_state_shardings(tx, s)
    step = step_lib.make_train_step(s.graphdef, tx, cfg, s.mesh, s.param_shardings, opt_shardings)
    params = ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings)
    opt_state = ckpt.abstract_with_shardings(abstract_opt, opt_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=shd.batch_sharding(s.mesh))
    step_no = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(s.mesh))
    kind = s.mesh.devices.flat[0].device_kind
    hbm = hbm_bytes(kind)
    lowered = step.lower(params, opt_state, batch, step_no)
    xla_cost = None
    try:
        compiled = lowered.compile()
        mem = compiled.memory_analysis()
        xla_cost = compiled.cost_analysis()
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
    speed = predict_speed(cfg, step, (params, opt_state, batch, step_no), n_devices=int(s.mesh.devices.size),
                          device_kind=kind, io_bytes=args + out - alias, xla_cost=xla_cost)
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
        **speed,
    }


def predict_speed(cfg: Config, step, abstract_args, *, n_devices: int, device_kind: str, io_bytes: int,
                  xla_cost=None) -> dict[str, Any]:
    """A roofline lower bound on the step time and the MFU it implies.

    FLOPs: the traced step's matmul FLOPs with loops counted as they run (`flop_count`), against the
    model's analytic FLOPs (`flops.flops_per_token`); their ratio exposes rematerialisation and any
    other work beyond the model's (e.g. moe's dense dispatch). Bytes: at least every argument read and
    every output written once per step (XLA's memory analysis), or XLA's own byte count when larger
    (XLA counts a loop body once, so its figure is a lower bound too). Time >= max(FLOPs / peak,
    bytes / HBM bandwidth) per chip.
    """
    from vffn_jax.perf import flop_trace as flop_count
    from vffn_jax.perf import flops as flops_lib

    tokens = cfg.train.batch_size * cfg.train.seq_len
    analytic = flops_lib.flops_per_token(cfg.model, cfg.train.seq_len, train=True) * tokens
    traced = flop_count.traced_step_flops(step, *abstract_args)
    notes: list[str] = []
    cost = (xla_cost[0] if isinstance(xla_cost, list) else xla_cost) or {}
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    chip = chip_for(device_kind)
    peak, bandwidth = (chip.peak_flops, chip.hbm_bandwidth) if chip else (None, None)
    flops_dev, bytes_dev = traced["flops"] / n_devices, max(float(io_bytes), xla_bytes)
    if traced["pallas_calls"]:
        # splash declares no cost: count its score/value products as the analytic model does (4 T d per token and
        # layer, forward), x3 for forward + backward, plus the recomputed forward under remat
        passes = 3 + (cfg.model.remat != "none")
        attention = passes * cfg.model.n_layers * 4 * cfg.train.seq_len * cfg.model.d_model * tokens
        traced = {**traced, "flops": traced["flops"] + attention}
        notes.append(f"{traced['pallas_calls']} Pallas kernel call(s) (splash attention) declare no FLOPs; counted as "
                     f"the analytic attention FLOPs ({attention:.4g} per step)")
        flops_dev = traced["flops"] / n_devices
    out: dict[str, Any] = {
        "flops_step_analytic": analytic, "flops_step_traced": traced["flops"],
        "flops_ratio": traced["flops"] / analytic if analytic else None,
        "xla_flops_per_device_loops_once": float(cost["flops"]) if "flops" in cost else None,
        "bytes_per_device_lower_bound": bytes_dev, "peak_flops": peak, "hbm_bandwidth": bandwidth,
        "roofline_step_s": None, "roofline_bound": None, "roofline_mfu": None, "roofline_tokens_per_sec_per_chip": None,
        "speed_notes": notes,
    }
    if peak and bandwidth:
        t_compute, t_memory = flops_dev / peak, bytes_dev / bandwidth
        t = max(t_compute, t_memory)
        out.update(roofline_step_s=t, roofline_bound="compute" if t_compute >= t_memory else "memory",
                   roofline_mfu=analytic / n_devices / (t * peak), roofline_tokens_per_sec_per_chip=tokens / n_devices / t)
    return out


# XLA:TPU's compile-time OOM: "... HLO temporaries (157.22G) exceeds available HBM (15.75G)"
_HBM_OOM = re.compile(r"temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def _nbytes_per_device(x: jax.ShapeDtypeStruct) -> int:
    return int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize


def compile_eval_step(cfg: Config, devices) -> dict[str, Any]:
    """AOT-compiles the inference-mode eval step (held-out loss; for depth-routed variants the depth loops run as
    `model.depth_exec` says, compact: data-dependent loop bounds per device) and returns its memory per device."""
    s = placement.setup(cfg, devices)
    from vffn_jax.evals import step as eval_step_lib

    step = eval_step_lib.make_eval_step(s.graphdef, cfg, s.mesh, s.param_shardings)
    params = ckpt.abstract_with_shardings(s.abstract_params, s.param_shardings)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=shd.batch_sharding(s.mesh))
    try:
        mem = step.lower(params, batch).compile().memory_analysis()
        temp = mem.temp_size_in_bytes
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + temp + mem.generated_code_size_in_bytes
    except Exception as e:  # refused for memory, like the train step: report what it needed
        oom = _HBM_OOM.search(str(e))
        if oom is None:
            raise
        temp = _bytes(*oom.group(1, 2))
        total = temp + sum(_nbytes_per_device(x) for x in jax.tree.leaves((params, batch)))
    return {"depth_exec": cfg.model.depth_exec, "temp_bytes": int(temp), "per_device_bytes": int(total)}


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
        *_speed_lines(r),
        *([f"  eval step   {gib(r['eval']['per_device_bytes'])}  compiled too (inference mode, model.depth_exec="
           f"{r['eval']['depth_exec']}; temporaries {gib(r['eval']['temp_bytes']).strip()})"] if "eval" in r else []),
    ])


def _speed_lines(r: dict[str, Any]) -> list[str]:
    if r.get("flops_step_traced") is None:
        return []
    lines = [f"  FLOPs/step  {r['flops_step_traced']:.4g} traced (loops as they run) vs {r['flops_step_analytic']:.4g} "
             f"analytic: ratio {r['flops_ratio']:.3f}  (remat and other extra work)"]
    lines += [f"  note        {n}" for n in r.get("speed_notes", [])]
    if r["roofline_step_s"] is None:
        return lines + ["  roofline    unknown: no peak FLOPs / HBM bandwidth figure for this chip"]
    return lines + [
        f"  roofline    step >= {r['roofline_step_s'] * 1e3:.1f} ms ({r['roofline_bound']}-bound: "
        f"{r['peak_flops'] / 1e12:.0f} TFLOP/s, {r['hbm_bandwidth'] / 1e9:.0f} GB/s per chip) -> at most "
        f"{r['roofline_tokens_per_sec_per_chip']:,.0f} tokens/s per chip, MFU <= {100 * r['roofline_mfu']:.1f}%"]


# --------------------------------------------------------------------------- sweep

DEFAULT_SWEEP = "model.remat=none,dots,full;train.grad_accum=1,2,4;model.attention=xla,splash"


def sweep_candidates(cfg: Config, spec: str) -> list[dict[str, str]]:
    """The override sets of a sweep spec `KEY=V1,V2;KEY=...` (a cartesian product). Keys this config
    does not have (e.g. an option of another version) are left out."""
    import itertools

    from vffn_jax.config import apply_overrides

    dims: list[list[tuple[str, str]]] = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise ConfigError(f"--sweep {spec!r}: expected KEY=V1,V2;KEY=V1,... (e.g. {DEFAULT_SWEEP})")
        try:
            apply_overrides(cfg, {key.strip(): values.split(",")[0].strip()})
        except ConfigError as e:
            if "unknown config key" in str(e):
                continue
            raise
        dims.append([(key.strip(), v.strip()) for v in values.split(",") if v.strip()])
    return [dict(combo) for combo in itertools.product(*dims)]


def sweep(cfg: Config, devices, spec: str = DEFAULT_SWEEP, log=print) -> dict[str, Any]:
    """Compiles every candidate of `spec` for `devices`; returns {"rows": [...], "best": row or None}:
    the fitting candidate with the shortest roofline step time (the global batch stays the run's)."""
    from vffn_jax.config import apply_overrides, validate

    rows = []
    for over in sweep_candidates(cfg, spec):
        label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in over.items())
        try:
            c = apply_overrides(cfg, over)
            validate(c, n_devices=len(devices))
            r = compile_train_step(c, devices)
        except ConfigError as e:
            rows.append({"overrides": over, "label": label, "skipped": str(e)})
            log(f"sweep: {label}: skipped ({e})")
            continue
        dp = r["mesh"].get("data", 1) * r["mesh"].get("fsdp", 1)
        micro = c.train.batch_size // dp // max(getattr(c.train, "grad_accum", 1), 1)
        row = {"overrides": over, "label": label, "per_chip_microbatch": micro, **r}
        rows.append(row)
        t = r["roofline_step_s"]
        log(f"sweep: {label}: {r['per_device_bytes'] / GiB:.2f} GiB {'fits' if r['fits'] else 'does not fit'}"
            + (f", step >= {t * 1e3:.1f} ms, MFU <= {100 * r['roofline_mfu']:.1f}%" if t else ""))
    fitting = [r for r in rows if r.get("fits") and r.get("roofline_step_s")]
    # ties (the roofline sees neither kernel efficiency nor activation traffic) go to less work, then the larger
    # per-chip microbatch (better utilisation in practice), then the smaller footprint
    best = min(fitting, key=lambda r: (round(r["roofline_step_s"], 6), r["flops_step_traced"],
                                       -r["per_chip_microbatch"], r["per_device_bytes"])) if fitting else None
    return {"spec": spec, "rows": rows, "best": best}


def format_sweep(result: dict[str, Any]) -> str:
    lines = [f"sweep ({result['spec']}):",
             f"  {'candidate':<44} {'micro/chip':>10} {'GiB':>8} {'fits':>5} {'step >= ms':>11} {'MFU <=':>7}"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"  {r['label']:<44} skipped: {r['skipped'][:80]}")
            continue
        t = r["roofline_step_s"]
        lines.append(f"  {r['label']:<44} {r['per_chip_microbatch']:>10} {r['per_device_bytes'] / GiB:>8.2f} "
                     f"{'yes' if r['fits'] else 'no':>5} {t * 1e3 if t else float('nan'):>11.1f} "
                     f"{100 * r['roofline_mfu'] if t else float('nan'):>6.1f}%")
    best = result["best"]
    if best is None:
        lines.append("  no candidate fits: lower the batch, raise grad_accum or remat, or use more chips")
    else:
        flags = " ".join(f"--set {k}={v}" for k, v in best["overrides"].items())
        lines.append(f"  fastest that fits: {best['label']} (step >= {best['roofline_step_s'] * 1e3:.1f} ms): {flags}")
    return "\n".join(lines)
