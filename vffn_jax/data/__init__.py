"""Data: tokenizers, source readers, tokenising into shards (+ manifest), the grain pipeline, the default corpus."""
