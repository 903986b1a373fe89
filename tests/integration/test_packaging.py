"""`pip install .` gives a package that finds its presets from any directory and installs console scripts that
work outside the checkout (a real wheel build, real installs, fresh interpreters). pyproject.toml's pins and
package list: tests/unit/project/test_pyproject.py."""
import json
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


SCRIPTS = ("vffn-train", "vffn-eval", "vffn-generate", "vffn-tokenize", "vffn-hf", "vffn-export", "vffn-lm-eval",
           "vffn-study", "vffn-gcs-emulator", "vffn-supervise")


@pytest.mark.slow
def test_installed_console_scripts_run_a_tiny_cycle_from_outside_the_checkout(tmp_path):
    """`pip install` of the wheel puts every console script on PATH; from a folder outside the checkout (the
    checkout not importable) they train, evaluate, generate and export, giving what the root scripts give."""
    from vffn_jax.testing.processes import child_env
    from vffn_jax.testing.shapes import tiny_args

    wheel = _build_wheel(tmp_path)
    prefix = tmp_path / "prefix"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--prefix",
                          str(prefix), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (site,) = prefix.glob("lib/python*/site-packages")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**child_env(1), "PYTHONPATH": str(site)}  # the installed package, not the checkout

    def script(name, *args, cwd=elsewhere):
        return subprocess.run([str(prefix / "bin" / name), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)

    for name in SCRIPTS:
        res = script(name, "--help")
        assert res.returncode == 0 and f"usage: {name}" in res.stdout, (name, res.stdout[-500:], res.stderr[-2000:])
    probe = subprocess.run([sys.executable, "-c", "import vffn_jax; print(vffn_jax.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=120)
    assert Path(probe.stdout.strip()).is_relative_to(site), probe.stdout

    res = script("vffn-train", *tiny_args({"train.steps": 2, "run.ckpt_every": 2}), "--workdir", "run", "--no-progress")
    assert res.returncode == 0 and "done: step 2" in res.stdout, res.stderr[-3000:]
    run = elsewhere / "run"
    gen_args = ["--prompt", "In the beginning", "--temperature", "0", "--max-new-tokens", "6", "--json"]
    installed = {"eval": script("vffn-eval", "--workdir", run, "--json", "--no-plot"),
                 "generate": script("vffn-generate", "--workdir", run, *gen_args)}
    in_checkout = {"eval": subprocess.run([sys.executable, "eval.py", "--workdir", run, "--json", "--no-plot"],
                                          cwd=ROOT, env=child_env(1), capture_output=True, text=True, timeout=600),
                   "generate": subprocess.run([sys.executable, "generate.py", "--workdir", run, *gen_args], cwd=ROOT,
                                              env=child_env(1), capture_output=True, text=True, timeout=600)}
    for name in installed:
        for res in (installed[name], in_checkout[name]):
            assert res.returncode == 0, res.stderr[-3000:]
    a, b = (json.loads(r.stdout[r.stdout.find("{"):]) for r in (installed["eval"], in_checkout["eval"]))
    assert a["loss"] == b["loss"] and a["step"] == b["step"] == 2
    a, b = (json.loads(r.stdout[r.stdout.find("{"):]) for r in (installed["generate"], in_checkout["generate"]))
    assert [t["id"] for t in a["generations"][0]["tokens"]] == [t["id"] for t in b["generations"][0]["tokens"]]
    res = script("vffn-hf", "export", "--workdir", run, "--out", "hf")
    assert res.returncode == 0 and (elsewhere / "hf" / "config.json").is_file(), res.stderr[-3000:]
