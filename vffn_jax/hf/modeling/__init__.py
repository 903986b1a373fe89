"""The Hugging Face modeling code shipped inside every non-dense export (`trust_remote_code=True`).

`configuration_vffn.py` and `modeling_vffn.py` are copied verbatim into the exported folder by
`vffn_jax/hf/export.py`; they import only torch, transformers and the standard library, never vffn_jax.
"""
