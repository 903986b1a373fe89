"""`pip install .` gives a package that finds its presets from any directory (a real wheel build and a fresh
interpreter). pyproject.toml's pins and package list: tests/unit/project/test_pyproject.py."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the sources (the build writes into its source tree)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "vffn_jax", src / "vffn_jax", ignore=ignore)
    shutil.copytree(ROOT / "configs", src / "configs", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and ("No matching distribution" in res.stderr or "Could not find a version" in res.stderr):
        pytest.skip(f"cannot fetch the build backend (setuptools) for an isolated build: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr
    (wheel,) = out.glob("vffn_jax-*.whl")
    return wheel


def test_the_wheel_ships_every_module_and_preset_and_finds_them_from_anywhere(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "vffn_jax").rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    tasks = {p.relative_to(ROOT).as_posix() for p in (ROOT / "vffn_jax" / "evals" / "lm_eval_tasks").glob("*.yaml")}
    assert len(tasks) >= 9 and tasks <= names, f"lm-eval task files missing from the wheel: {sorted(tasks - names)}"
    for kind in ("scales", "variants"):
        presets = {f"vffn_jax/presets/{kind}/{p.name}" for p in (ROOT / "configs" / kind).glob("*.json")}
        assert presets and presets <= names, f"missing from the wheel: {sorted(presets - names)}"

    site = tmp_path / "site"  # what pip install puts in site-packages
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import vffn_jax.config as c; cfg = c.load_config('tiny', 'width_shared'); "
            "print(c.CONFIGS_DIR); print(cfg.scale, cfg.variant, cfg.model.d_model)")
    res = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    configs_dir, loaded = res.stdout.split("\n")[:2]
    assert Path(configs_dir) == site / "vffn_jax" / "presets"
    assert loaded == "tiny width_shared 128"


def test_a_checkout_reads_the_presets_in_configs():
    from vffn_jax import config
    assert config.CONFIGS_DIR == ROOT / "configs"
    assert "tiny" in config.available("scales") and "versatile" in config.available("variants")
