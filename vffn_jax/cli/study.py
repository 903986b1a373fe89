"""`vffn-study` (also `python -m vffn_jax.study`): every variant x regime x seed at a preset's scale, statistics,
results.md and plots (vffn_jax/study/runner.py)."""
from __future__ import annotations

from vffn_jax import config as config_lib
from vffn_jax import errors
from vffn_jax.cli import runner
from vffn_jax.config import ConfigError
from vffn_jax.study.budget import run_budget_study
from vffn_jax.study.presets import PRESETS, VARIANTS
from vffn_jax.study.runner import run_study


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from vffn_jax.study import runner as study_runner

    ap = runner.parser("vffn-study", study_runner.__doc__)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="study scale (default: cpu)")
    ap.add_argument("--out", required=True, help="study directory (run workdirs, results.md/json, plots)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds per variant and regime (default 3; a budget preset: its grid's seeds)")
    ap.add_argument("--variants", type=_csv, default=None,
                    help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    ap.add_argument("--regimes", type=_csv, default=None, help="scratch,continued (default: both)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps of every run (dense base, scratch and continuation; default: the preset's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every run, e.g. --set data.path=tfds:fineweb_edu (repeatable)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the planned runs and their configs (a budget preset: the grid, which runs are "
                         "finished and the estimated wall time), train nothing")
    ap.add_argument("--report-only", action="store_true",
                    help="budget presets: rewrite results.md/json and the plot from the finished runs, train nothing")
    args = ap.parse_args(argv)
    try:
        overrides = config_lib.parse_set_args(args.overrides)
        if PRESETS[args.preset].grid is not None:
            if args.regimes or args.steps:
                raise ConfigError(f"--preset {args.preset} is a budget study (scratch only, steps from the grid): "
                                  "--regimes and --steps do not apply")
            run_budget_study(args.preset, args.out, seeds=args.seeds, variants=args.variants, overrides=overrides,
                             dry_run=args.dry_run, report_only=args.report_only, log=lambda s: print(s, flush=True))
            return 0
        if args.report_only:
            raise ConfigError("--report-only is for budget presets (the two-regime study reports at its end)")
        doc = run_study(args.preset, args.out, seeds=args.seeds, variants=args.variants, regimes=args.regimes,
                        steps=args.steps, overrides=overrides, dry_run=args.dry_run,
                        log=lambda s: print(s, flush=True))
    except ConfigError as e:
        return errors.report(e)
    if args.dry_run:
        if PRESETS[args.preset].note:
            print(PRESETS[args.preset].note)
        for r in doc["runs"]:
            c = r["config"]
            print(f"{r['regime']:9s} {r['variant']:13s} seed{r['seed']} ffn={c['model']['ffn']} "
                  f"steps={c['train']['steps']} init_from={c['train']['init_from'] or '-'} -> {r['workdir']}")
    return 0


def console() -> None:
    """The `vffn-study` console script."""
    runner.console(main)


if __name__ == "__main__":
    console()
