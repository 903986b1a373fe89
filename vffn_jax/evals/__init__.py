"""Evaluation: held-out loss, zero-shot downstream tasks, the per-layer depth/expert/FLOP summary."""
