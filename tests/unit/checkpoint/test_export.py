"""vffn_jax/checkpoint/export.py through `vffn-export`: an --out that already holds files is refused (exit 2 naming
it) unless --overwrite, which deletes them first but never the run being exported; an empty folder is fine.
(The export's contents, restored by eval.py: tests/unit/evals/test_heldout.py.)"""
import shutil

from vffn_jax.checkpoint import manager as ckpt
from vffn_jax.cli import export as export_cli
from vffn_jax.testing.cli import call


def test_non_empty_out_needs_overwrite(params_only_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(params_only_run, run)  # a copy: the refusal to delete the run must not risk the session's
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("not an export")
    res = call(export_cli.main, "--workdir", run, "--out", out)
    assert res.returncode == 2, res.stderr
    assert f"error: --out={out} already exists and is not an empty folder" in res.stderr and "--overwrite" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr and [p.name for p in out.iterdir()] == ["notes.txt"]

    res = call(export_cli.main, "--workdir", run, "--out", out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file() and ckpt.all_steps(out) == [3]
    res = call(export_cli.main, "--workdir", run, "--out", tmp_path, "--overwrite")  # the folder holding the run
    assert res.returncode == 2 and f"--out={tmp_path} holds the run" in res.stderr, res.stderr
    assert ckpt.all_steps(run) == [3]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert call(export_cli.main, "--workdir", run, "--out", empty).returncode == 0
    assert "--overwrite" in call(export_cli.main, "--help").stdout
