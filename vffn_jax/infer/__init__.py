"""Inference: the KV-cache generation loop and sampling."""
