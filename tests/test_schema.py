from __future__ import annotations

from pathlib import Path

from backend.api.schema import build_schema
from tests.contract import missing_from

ROOT = Path(__file__).resolve().parent.parent
# The public API contract, kept in the repository: schema.graphql must contain all of it.
CONTRACT = ROOT / "docs" / "api-contract.graphql"


def test_committed_schema_matches_the_code() -> None:
    exported = build_schema().as_str() + "\n"
    committed = (ROOT / "schema.graphql").read_text()
    assert committed == exported, (
        "schema.graphql drifted: run `mailsync export-schema > schema.graphql`"
    )


def test_schema_contains_the_whole_api_contract() -> None:
    assert missing_from(CONTRACT.read_text(), (ROOT / "schema.graphql").read_text()) == []


def test_contract_checker_notices_a_missing_field() -> None:
    contract = "type Query { a: Int  b(first: Int = 20): String }  enum E { X Y }"
    actual = "type Query { a: Int  b(first: Int!): String }  enum E { X }"
    assert sorted(missing_from(contract, actual)) == [
        "argument Query.b(first) is Int! = None, contract: Int = 20",
        "enum value E.Y is missing",
    ]
