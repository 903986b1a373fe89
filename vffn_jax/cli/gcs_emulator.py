"""`vffn-gcs-emulator` (also `python -m vffn_jax.cli.gcs_emulator`): a real GCS emulator on 127.0.0.1 for trying
gs:// runs without a cloud (vffn_jax/testing/gcs_emulator.py)."""
from __future__ import annotations

import signal

from vffn_jax.cli import runner
from vffn_jax.testing import gcs_emulator


def main(argv: list[str] | None = None) -> int:
    p = runner.parser("vffn-gcs-emulator", gcs_emulator.__doc__)
    p.add_argument("--port", type=int, default=4443, help="port on 127.0.0.1 (default 4443)")
    p.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    args = p.parse_args(argv)
    with gcs_emulator.GcsEmulator(args.port) as emu:
        for name in args.bucket:
            print(f"# created {emu.create_bucket(name)}")
        for key, value in emu.env.items():
            print(f"export {key}={value}")
        print("# serving until Ctrl-C (the in-memory buckets are lost when it stops)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


def console() -> None:
    """The `vffn-gcs-emulator` console script."""
    runner.console(main)


if __name__ == "__main__":
    console()
