"""lm-evaluation-harness in real processes (vffn_jax/evals/lm_harness.py): the `python -m vffn_jax.evals.lm_harness`
command line imports no torch and, on one device, writes the scores of the 8-device in-process run; the real
`lm_eval --model hf` on the Hugging Face export gets the same answers as the JAX backend. The run, backend results
and export are the fixtures of tests/unit/evals/test_lm_harness.py."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.unit.evals.test_lm_harness import LIMIT, _sums, hf_dir, lm, ours, pytestmark, run_dir  # noqa: F401
from vffn_jax.evals.lm_eval_tasks import TASKS_DIR
from vffn_jax.testing.processes import run_script

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_cli_imports_no_torch_and_writes_json(run_dir, ours, tmp_path):
    """A real process (torch may already be imported in this one): running the command line imports neither
    torch nor transformers, and on one CPU device it writes the scores of the 8-device run."""
    out = tmp_path / "res.json"
    code = ("import sys; from vffn_jax.cli import lm_eval; "
            f"rc = lm_eval.main(['--workdir', {str(run_dir)!r}, '--tasks', 'vffn_arc_easy', '--limit', '{LIMIT}', "
            f"'--output', {str(out)!r}]); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; sys.exit(rc)")
    # one CPU device: the numbers must not depend on the mesh
    p = run_script(["-c", code], devices=1, env=OFFLINE, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "vffn_arc_easy" in p.stdout and "acc_norm" in p.stdout
    written = json.loads(out.read_text())
    assert written["results"]["vffn_arc_easy"]["acc,none"] == ours["results"]["vffn_arc_easy"]["acc,none"]


def test_lm_eval_hf_backend_gives_the_same_answers(ours, hf_dir, tmp_path):
    """The real `lm_eval --model hf` on the export, offline, on the same questions: same accuracy, same
    per-request log-likelihoods."""
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("lm-eval's hf backend imports accelerate (the lm-eval[hf] extra), which is not installed")
    out = tmp_path / "lm_eval_hf"
    # run from elsewhere, vffn_jax not on the path: the tasks' utils.py finds the source tree it sits in
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | OFFLINE
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={hf_dir},trust_remote_code=True,backend=causal,dtype=float32", "--tasks", "vffn_arc_easy",
           "--include_path", str(TASKS_DIR), "--limit", str(LIMIT), "--device", "cpu", "--batch_size", "8",
           "--output_path", str(out), "--log_samples"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    theirs = json.loads(Path(results_file).read_text())
    (samples_file,) = glob.glob(str(out / "*" / "samples_vffn_arc_easy_*.jsonl"))
    samples = sorted((json.loads(line) for line in Path(samples_file).read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    theirs_sums = np.array([float(r[0][0]) for s in samples for r in s["resps"]])
    np.testing.assert_allclose(_sums(ours, "vffn_arc_easy"), theirs_sums, atol=1e-3, rtol=0)
    for metric in ("acc,none", "acc_norm,none"):
        assert theirs["results"]["vffn_arc_easy"][metric] == ours["results"]["vffn_arc_easy"][metric]
