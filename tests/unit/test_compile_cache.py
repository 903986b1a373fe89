"""vffn_jax/compile_cache.py: a run.compile_cache folder that cannot be used is refused when training starts (exit 2
naming the field), where JAX itself would only warn and compile every program again."""
import jax

from vffn_jax.cli import train as train_cli
from vffn_jax.testing.cli import call


def test_unusable_compile_cache_exits_2_at_start_up(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "cache"  # a folder under a regular file cannot be created
    before = jax.config.jax_compilation_cache_dir
    res = call(train_cli.main, "--config", "tiny", "--workdir", tmp_path / "run", "--steps", 1, "--no-progress",
               "--set", f"run.compile_cache={cache}")
    assert res.returncode == 2, res.stderr
    assert f"error: run.compile_cache={cache}: cannot write there" in res.stderr
    assert "or set run.compile_cache=auto" in res.stderr and "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "run").exists()  # checked before the run directory is written
    assert jax.config.jax_compilation_cache_dir == before  # nor was the process's cache moved there
