"""The model: FFN variants (pure functions), attention kernels + RoPE, the transformer, abstract-first init and placement."""
