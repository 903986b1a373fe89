"""The tiers README's commands select, read from pytest's own collection (a real `python -m pytest --collect-only`
per tier): the default tier and `--tier rest` split `--tier all` with nothing lost or run twice, and nothing under
tests/integration/ or marked slow is in the default tier."""
import re

from vffn_jax.testing.processes import run_script


def _collected(*args) -> set[str]:
    res = run_script(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args], devices=8, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {line for line in res.stdout.splitlines() if re.match(r"tests/\S+\.py::", line)}


def test_default_and_rest_split_all():
    default, rest, everything = _collected(), _collected("--tier", "rest"), _collected("--tier", "all")
    assert default and rest
    assert not default & rest and default | rest == everything
    assert not [t for t in default if t.startswith("tests/integration/")]
    assert all(t.startswith(("tests/unit/", "tests/integration/")) for t in everything)
    slow = _collected("-m", "slow")
    assert slow and slow <= rest and not slow & default
    assert {t for t in everything if t.startswith("tests/integration/")} <= rest
