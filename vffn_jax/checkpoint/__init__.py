"""Checkpoints: the Orbax manager, integrity checksums, params-only restore, export."""
