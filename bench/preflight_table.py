#!/usr/bin/env python
"""README's TPU pre-flight table: the paper's three scales AOT-compiled for v5e and v5p slices,
with XLA attention and with the splash kernel (`model.attention`).

Each row is one `python train.py --config SCALE --dry-run --topology TOPO --set mesh.* --json` run
(a subprocess, so a failure is one row). Needs libtpu (`pip install -r requirements-tpu.txt`); each
compile takes a minute or more on a 2-core CPU.

  python bench/preflight_table.py [--only 354m] [--attention xla,splash] [--set model.doc_mask=true ...] [--out table.md]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024 ** 3

# (scale, topology, mesh overrides): batches are the paper's (384, 256, 128 sequences of 4096), so
# data*fsdp must divide them; 256 v5e chips take fsdp=128 x tensor=2.
ROWS = [
    ("354m", "v5p:4x4x4", {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}),
    ("720m", "v5p:4x4x4", {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}),
    ("1.2b", "v5p:4x4x4", {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}),
    ("354m", "v5e:16x16", {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 2}),
    ("720m", "v5e:16x16", {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 2}),  # fsdp 256 compiles too (README)
    ("1.2b", "v5e:16x16", {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 2}),
]


def run_row(scale: str, topology: str, mesh: dict, variant: str, attention: str = "xla", extra=()) -> dict:
    cmd = [sys.executable, "train.py", "--config", scale, "--variant", variant, "--dry-run", "--json",
           "--topology", topology, "--set", f"model.attention={attention}"]
    for k, v in mesh.items():
        cmd += ["--set", f"{k}={v}"]
    for item in extra:
        cmd += ["--set", item]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1], "cmd": " ".join(cmd[1:])}
    return {**json.loads(res.stdout), "cmd": " ".join(cmd[1:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="only this scale")
    ap.add_argument("--variant", default="versatile")
    ap.add_argument("--attention", default="xla,splash", help="comma-separated model.attention kernels, one row each")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every row")
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    lines = ["| scale | topology | chips (hosts) | mesh | batch | attention | args GiB | temps GiB | total GiB / HBM "
             "| fits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for scale, topology, mesh in ROWS:
        if args.only and scale != args.only:
            continue
        for attention in args.attention.split(","):
            r = run_row(scale, topology, mesh, args.variant, attention, args.set)
            if "error" in r:
                lines.append(f"| {scale} | {topology} | | | | {attention} | | | error: {r['error']} | |")
            else:
                p = r["preflight"]
                m = p["mesh"]
                lines.append(
                    f"| {scale} | {topology} | {p['devices']} ({p['processes']}) | data {m['data']} x fsdp {m['fsdp']} "
                    f"x tensor {m['tensor']} | {p['batch_size']} x {p['seq_len']} | {attention} | "
                    f"{p['argument_bytes'] / GiB:.2f} | {p['temp_bytes'] / GiB:.2f} | "
                    f"{p['per_device_bytes'] / GiB:.2f} / {p['hbm_bytes'] / GiB:.0f} | {'yes' if p['fits'] else 'no'} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
