"""The test suite's own shape: no test file directly under tests/, unit tests at the path that mirrors the module
they test (tests/unit/<subpackage>/test_<module>.py for vffn_jax/<subpackage>/<module>.py). The tiers themselves:
tests/integration/test_tiers.py."""
from pathlib import Path


ROOT = Path(__file__).resolve().parents[3]
TESTS = ROOT / "tests"
PKG = ROOT / "vffn_jax"
# Not a module of vffn_jax: the repository as a whole (README/docs, the package's shape, pins, this file), and the
# root command-line scripts (train.py, eval.py, generate.py), whose tests mirror the script's name.
NOT_MODULES = {"project"}
ROOT_SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def _test_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("test_*.py"))


def _module_for(test_file: Path) -> Path | None:
    """The vffn_jax module (or subpackage) a unit test file mirrors; None when it mirrors nothing."""
    rel = test_file.relative_to(TESTS / "unit")
    name = rel.stem.removeprefix("test_")
    folder = PKG.joinpath(*rel.parts[:-1])
    for candidate in (folder / f"{name}.py", folder / name / "__init__.py"):
        if candidate.exists():
            return candidate
    if len(rel.parts) == 1 and name in ROOT_SCRIPTS:
        return ROOT / f"{name}.py"
    return None


def test_no_test_file_directly_under_tests():
    assert not list(TESTS.glob("test_*.py")), "tests live in tests/unit/<subpackage>/ or tests/integration/"


def test_unit_tests_mirror_the_package():
    stray = [str(p.relative_to(TESTS)) for p in _test_files(TESTS / "unit")
             if p.relative_to(TESTS / "unit").parts[0] not in NOT_MODULES and _module_for(p) is None]
    assert not stray, ("these unit test files mirror no module (tests/unit/<subpackage>/test_<module>.py for "
                       f"vffn_jax/<subpackage>/<module>.py): {stray}")


def test_the_mirror_check_can_fail(tmp_path):
    assert _module_for(TESTS / "unit" / "model" / "test_ffn.py") == PKG / "model" / "ffn.py"
    assert _module_for(TESTS / "unit" / "model" / "test_no_such_module.py") is None
    assert _module_for(TESTS / "unit" / "test_generate.py") == ROOT / "generate.py"
