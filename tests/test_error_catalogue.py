"""User error codes come from one catalogue, each with one meaning, listed for clients."""

from __future__ import annotations

import re
from pathlib import Path

from backend.kit.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[1]


def test_every_code_is_documented_once_in_the_docs_and_the_schema() -> None:
    docs = (ROOT / "docs" / "errors.md").read_text()
    schema = (ROOT / "schema.graphql").read_text()
    for code in ErrorCode:
        assert docs.count(f"| `{code.value}` | {code.meaning} |") == 1, code
        assert f"{code.value}: {code.meaning}" in schema, code
    documented = re.findall(r"^\| `([A-Z_]+)` \|", docs, flags=re.M)
    assert documented == [c.value for c in ErrorCode]


def test_each_meaning_is_given_to_one_code() -> None:
    meanings = [c.meaning for c in ErrorCode]
    assert len(set(meanings)) == len(meanings)
