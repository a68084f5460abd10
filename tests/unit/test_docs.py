"""The test ids docs/rfc-compliance.md cites as proof exist: a renamed or deleted test must not leave a
requirement claimed on a test that is gone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CITED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^\]`]*\])?`")


def cited_tests() -> list[tuple[str, str]]:
    text = (REPO / "docs" / "rfc-compliance.md").read_text()
    return sorted(set(CITED.findall(text)))


def test_the_page_cites_tests() -> None:
    assert len(cited_tests()) > 50


@pytest.mark.parametrize(("path", "name"), cited_tests())
def test_cited_test_exists(path: str, name: str) -> None:
    source = (REPO / path)
    assert source.is_file(), f"docs/rfc-compliance.md cites {path}, which does not exist"
    assert re.search(rf"^def {name}\(", source.read_text(), flags=re.M), (
        f"docs/rfc-compliance.md cites {path}::{name}, which is not a test function there")
