"""Fixtures of the data tests."""
import pytest

from tests.unit.data.corpora import write_jsonl


@pytest.fixture
def jsonl(tmp_path):
    """`corpora.DOCS` as a .jsonl source (10% held out), tokenised into a cache of its own."""
    return write_jsonl(tmp_path)
