"""Studies: every variant x regime x seed trained and compared (presets, plan, run, statistics, report, plots)."""
