"""pytest markers shared by the tests."""
from __future__ import annotations

import importlib.util

import pytest

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None


def needs_libtpu(test):
    """The optional TPU extra: skipped (with the install command) without libtpu, and marked `tpu_extra` so
    that `python -m pytest -q -m tpu_extra` runs exactly these once requirements-tpu.txt is installed."""
    skip = pytest.mark.skipif(not HAVE_LIBTPU,
                              reason="libtpu not installed (optional extra: pip install -r requirements-tpu.txt)")
    return pytest.mark.tpu_extra(skip(test))
