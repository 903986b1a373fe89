"""The one table of accelerator chips: peak dense bf16 FLOP/s, HBM bytes and HBM bandwidth per chip (vendor
figures), used for MFU (perf/flops.py, train/goodput.py) and by the TPU pre-flight (memory fit and roofline)."""
from __future__ import annotations

import dataclasses

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    key: str  # a lower-case substring of `jax.Device.device_kind`
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s


# Most specific key first: "TPU v5 lite" (v5e) before "TPU v5" (v5p reports "TPU v5").
CHIPS = (
    Chip("tpu v5 lite", 197e12, 16 * GiB, 819e9),  # v5e
    Chip("tpu v5e", 197e12, 16 * GiB, 819e9),
    Chip("tpu v5p", 459e12, 95 * GiB, 2765e9),
    Chip("tpu v5", 459e12, 95 * GiB, 2765e9),
    Chip("tpu v6 lite", 918e12, 32 * GiB, 1640e9),  # v6e (Trillium)
    Chip("tpu v6", 918e12, 32 * GiB, 1640e9),
    Chip("tpu v4", 275e12, 32 * GiB, 1228e9),
    Chip("h200", 989e12, int(141e9), 4800e9),
    Chip("h100", 989e12, int(80e9), 3350e9),
    Chip("a100", 312e12, int(80e9), 2039e9),
)


def chip_for(device_kind: str) -> Chip | None:
    """The table's row for a device kind (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"); None for CPUs and
    chips not in the table."""
    kind = device_kind.lower()
    return next((c for c in CHIPS if c.key in kind), None)
