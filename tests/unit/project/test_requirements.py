"""The pinned TPU runtime must be the one the pinned JAX declares for itself (no JAX import, no compile).

jax's own metadata says which libtpu its `tpu` extra wants (`libtpu==0.0.42.*` for jax 0.10.2);
requirements-tpu.txt must pin a libtpu inside that, requirements.txt must pin the installed jax, and an
installed libtpu must satisfy it too.
"""
from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from vffn_jax.testing.markers import needs_libtpu

ROOT = Path(__file__).resolve().parents[3]


def _requirements(path: Path) -> list[Requirement]:
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            reqs.append(Requirement(line))
    return reqs


def _by_name(reqs: list[Requirement], name: str) -> list[Requirement]:
    return [r for r in reqs if canonicalize_name(r.name) == canonicalize_name(name)]


def _exact_version(req: Requirement) -> Version:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version, \
        f"{req} should be an exact pin (==X.Y.Z) so installs are reproducible"
    return Version(specs[0].version)


def _jax_libtpu_specifier() -> SpecifierSet:
    """The libtpu specifier the installed jax declares for its `tpu` extra."""
    found = [Requirement(r) for r in md.requires("jax") or []]
    found = [r for r in found if canonicalize_name(r.name) == "libtpu"
             and r.marker is not None and r.marker.evaluate({"extra": "tpu"})]
    assert len(found) == 1, f"jax {md.version('jax')} declares no single libtpu for its tpu extra: {found}"
    return found[0].specifier


def test_requirements_pin_the_installed_jax():
    jax_version = Version(md.version("jax"))
    reqs = _requirements(ROOT / "requirements.txt")
    for name in ("jax", "jaxlib"):
        pins = _by_name(reqs, name)
        assert len(pins) == 1, f"requirements.txt should pin {name} exactly once, has {pins}"
        assert _exact_version(pins[0]) == jax_version, \
            f"requirements.txt pins {pins[0]} but jax {jax_version} is installed"


def test_tpu_requirements_pin_the_libtpu_jax_declares():
    spec = _jax_libtpu_specifier()
    jax_version = Version(md.version("jax"))
    reqs = _requirements(ROOT / "requirements-tpu.txt")
    libtpu, jax = _by_name(reqs, "libtpu"), _by_name(reqs, "jax")
    assert libtpu or jax, "requirements-tpu.txt names neither libtpu nor jax[tpu]"
    for r in jax:  # jax[tpu]==X: pip then takes libtpu from jax's own declaration
        assert "tpu" in r.extras, f"{r}: the jax line in requirements-tpu.txt should carry the [tpu] extra"
        assert _exact_version(r) == jax_version, f"requirements-tpu.txt pins {r} but jax {jax_version} is installed"
    for r in libtpu:
        v = _exact_version(r)
        assert spec.contains(v, prereleases=True), \
            f"requirements-tpu.txt pins {r}, outside jax {jax_version}'s own libtpu{spec}"


@needs_libtpu
def test_installed_libtpu_is_the_one_jax_declares():
    installed = Version(md.version("libtpu"))
    spec = _jax_libtpu_specifier()
    assert spec.contains(installed, prereleases=True), \
        f"libtpu {installed} is installed but jax {md.version('jax')} declares libtpu{spec}: " \
        "pip install -r requirements-tpu.txt"
