"""`vffn-export` (also `python -m vffn_jax.cli.export`): a run's parameters as a params-only run directory
(vffn_jax/checkpoint/export.py)."""
from __future__ import annotations

from vffn_jax.checkpoint import export as ckpt_export
from vffn_jax.cli import runner


def main(argv: list[str] | None = None) -> int:
    p = runner.parser("vffn-export", ckpt_export.__doc__)
    p.add_argument("--workdir", required=True, help="the training run (local or gs://)")
    p.add_argument("--out", required=True, help="a new or empty folder for the export (local or gs://)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", default=None, choices=ckpt_export.DTYPES, help="cast the stored parameters (default: keep)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what a non-empty --out holds, then export into it (without it, a non-empty --out is "
                        "refused; never allowed for the run itself or a folder holding it)")
    args = p.parse_args(argv)
    runner.quiet_startup()
    from vffn_jax import errors

    try:
        info = ckpt_export.export(args.workdir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite)
    except Exception as e:  # bad input: `error: ...` and exit 2 or 3 (vffn_jax.errors); anything else is a bug
        return errors.report(e)
    print(f"exported {info['workdir']} step {info['step']} -> {info['out']} ({info['param_dtype']}, "
          f"{info['param_bytes'] / 2**20:,.1f} MiB of parameters)")
    return 0


def console() -> None:
    """The `vffn-export` console script."""
    runner.console(main)


if __name__ == "__main__":
    console()
