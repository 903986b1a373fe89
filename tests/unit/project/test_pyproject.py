"""pyproject.toml declares the same pins as the requirements files and lists every package (the wheel itself:
tests/integration/test_packaging.py)."""
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[3]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(path: Path) -> dict[str, str]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return _pins_from_lines([line for line in lines if line and not line.startswith("-")])


def _pins_from_lines(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        r = Requirement(line)
        out[canonicalize_name(r.name) + "".join(f"[{e}]" for e in sorted(r.extras))] = str(r.specifier)
    return out


def test_pyproject_declares_the_requirements_pins():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    declared = _pins_from_lines(project["dependencies"]) | _pins_from_lines(extras["test"])
    assert declared == _pins(ROOT / "requirements.txt")
    assert _pins_from_lines(extras["tpu"]) == _pins(ROOT / "requirements-tpu.txt")
    assert _pins_from_lines(extras["hf"]) == _pins(ROOT / "requirements-hf.txt")
    assert _pins_from_lines(extras["wandb"]) == _pins(ROOT / "requirements-wandb.txt")


def test_every_package_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vffn_jax").rglob("__init__.py")}
    missing = on_disk - listed
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
