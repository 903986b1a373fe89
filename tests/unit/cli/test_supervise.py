"""`vffn-supervise` (vffn_jax/cli/supervise.py) around small real commands whose exit statuses are scripted: which
statuses restart, the budget, the log. The training runs it supervises: tests/integration/train/test_supervise.py."""
import json
import sys

from vffn_jax.cli import supervise
from vffn_jax.testing.cli import call


def scripted(tmp_path, statuses) -> list[str]:
    """A command that ends with statuses[k] on its k-th run (a negative one: killed by that signal)."""
    script = tmp_path / "child.py"
    script.write_text(f"""import os, sys
from pathlib import Path
count = Path({str(tmp_path / 'count')!r})
k = int(count.read_text()) if count.exists() else 0
count.write_text(str(k + 1))
status = {statuses!r}[k]
if status < 0:
    os.kill(os.getpid(), -status)
sys.exit(status)
""")
    return [sys.executable, str(script)]


def run(tmp_path, statuses, *flags):
    log = tmp_path / "log.jsonl"
    res = call(supervise.main, "--backoff", 0, "--log", log, *flags, "--", *scripted(tmp_path, statuses))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return res, [r for r in rows if r["event"] == "exit"], rows


def test_restarts_on_preemption_hang_and_kill_until_done(tmp_path):
    res, exits, rows = run(tmp_path, [75, 86, -9, 4, 0])
    assert res.returncode == 0, res.stderr
    assert [e["status"] for e in exits] == [75, 86, 137, 4, 0]
    assert [e["meaning"] for e in exits][2] == "killed by SIGKILL"
    assert [e["next"] for e in exits] == [f"restart {k}/10 in 0 s" for k in range(1, 5)] + ["stop: not restartable"]
    assert [r["restart"] for r in rows if r["event"] == "start"] == [0, 1, 2, 3, 4]
    assert res.stderr.count("vffn-supervise: the command exited") == 5


def test_bad_input_a_crash_and_a_spent_budget_stop(tmp_path):
    for status in (2, 1, 3):
        (tmp_path / "count").unlink(missing_ok=True)
        (tmp_path / "log.jsonl").unlink(missing_ok=True)
        res, exits, _ = run(tmp_path, [status, 0])
        assert res.returncode == status and [e["next"] for e in exits] == ["stop: not restartable"]
    (tmp_path / "count").unlink()
    (tmp_path / "log.jsonl").unlink()
    res, exits, _ = run(tmp_path, [75] * 4, "--max-restarts", 2)
    assert res.returncode == 75 and len(exits) == 3 and exits[-1]["next"] == "stop: restart budget spent"


def test_command_line(tmp_path):
    assert supervise.workdir_of(["vffn-train", "--workdir", "gs://b/run"]) == "gs://b/run"
    assert supervise.workdir_of(["python", "train.py", "--workdir=runs/x"]) == "runs/x"
    assert supervise.workdir_of(["python", "train.py"]) is None
    assert call(supervise.main).returncode == 2  # no command
    missing = call(supervise.main, "--", str(tmp_path / "no-such-command"))
    assert missing.returncode == 2 and "no-such-command" in missing.stderr
    helptext = call(supervise.main, "--help")
    assert helptext.returncode == 0 and "--max-restarts" in helptext.stdout and "--backoff" in helptext.stdout
