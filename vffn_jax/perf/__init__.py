"""Performance accounting: analytic parameter/FLOP counts, MFU peaks, FLOPs traced from a jaxpr."""
