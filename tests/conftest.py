"""Test session set-up, shared by every tier.

- 8 fake CPU devices, set before jax is imported.
- One environment that every child process inherits: the persistent compile cache (`.jax_cache/`) and the
  data cache (`.test_cache/data`, so the default corpus and its token cache are built once, not once per test),
  both git-ignored in the checkout; HOME and the XDG/HF/W&B/matplotlib caches point into a private temporary
  folder, so no test writes under the user's `~/.cache`.
- Tiers: tests under `tests/integration/` are marked `integration`; long ones carry `@pytest.mark.slow`.
  `python -m pytest` runs the default tier (neither), `--tier rest` the others, `--tier all` everything.
  A run given explicit paths, or `-m`, selects by those alone.
- A real GCS emulator (fake-gcs-server on 127.0.0.1) for the `gs://` tests, and the session's shared runs.
"""
import os
import shutil
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="vffn-test-home-"))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))  # set either to measure a cold run
os.environ.setdefault("VFFN_JAX_CACHE_DIR", str(ROOT / ".test_cache" / "data"))
os.environ.update({
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    "HOME": str(_HOME),
    "XDG_CACHE_HOME": str(_HOME / ".cache"),
    "XDG_CONFIG_HOME": str(_HOME / ".config"),
    "MPLCONFIGDIR": str(_HOME / ".config" / "matplotlib"),
    "HF_HOME": str(_HOME / ".cache" / "huggingface"),
    "WANDB_DIR": str(_HOME / "wandb"), "WANDB_CACHE_DIR": str(_HOME / ".cache" / "wandb"),
    "WANDB_CONFIG_DIR": str(_HOME / ".config" / "wandb"), "WANDB_DATA_DIR": str(_HOME / "wandb-data"),
})

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

TIERS = {"default": "not integration and not slow", "rest": "integration or slow", "all": ""}


def pytest_addoption(parser):
    parser.addoption("--tier", choices=sorted(TIERS), default=None,
                     help="default: unit tests that are not slow (README's test command); rest: integration and "
                          "slow tests; all: both. Default: 'default' for a plain run, 'all' when paths or -m are given")


def pytest_collection_modifyitems(config, items):
    integration = ROOT / "tests" / "integration"
    for item in items:
        if integration in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
    tier = config.getoption("--tier")
    if tier is None:
        explicit = config.args_source == pytest.Config.ArgsSource.ARGS and any(
            Path(a.split("::")[0]).resolve() != ROOT / "tests" for a in config.args)
        tier = "all" if explicit or config.getoption("markexpr") else "default"
    if not TIERS[tier]:
        return
    keep, drop = [], []
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        is_rest = "integration" in marks or "slow" in marks
        (keep if is_rest == (tier == "rest") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def gcs_emulator():
    """One fake-gcs-server for the session; its variables are exported so subprocesses use it too."""
    from vffn_jax.testing.gcs_emulator import GcsEmulator

    emu = GcsEmulator().start()
    saved = {k: os.environ.get(k) for k in emu.env}
    os.environ.update(emu.env)
    yield emu
    emu.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """A fresh bucket on the emulator: returns 'gs://NAME'."""
    return gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A versatile run at the shared tiny shape (`testing.shapes.TINY_TRAIN`), trained once per session:
    4 steps, checkpoints at 2 and 4. Read-only: copy it (`shutil.copytree`) to change it."""
    from vffn_jax.testing.shapes import tiny_config
    from vffn_jax.train import loop

    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    summary = loop.train(tiny_config("versatile"), workdir, progress=False)
    assert summary["step"] == 4
    return workdir


@pytest.fixture(scope="session")
def params_only_run(tmp_path_factory):
    """A params-only run (no optimizer or data state) of a freshly initialised tiny versatile model with
    context 48 and large init (so routing varies): generation, export and lm-eval read it. Read-only."""
    from vffn_jax.testing.shapes import write_params_only_run

    return write_params_only_run(tmp_path_factory.mktemp("params_only") / "run", context=48, step=3)
