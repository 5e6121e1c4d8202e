"""Fuzzing the API (issue 13): GraphQL documents generated from the schema (valid ones and
ones that break it), and hostile bodies (invalid UTF-8, JSON that is no object, huge strings,
NUL bytes), sent to the ASGI app in-process as a signed-in user and as nobody. No answer may
be a 5xx, and no error may carry a Python exception's text: every error is GraphQL's own
parse or validation message, an error with a code (`extensions.code`), or the masked
"Unexpected error."."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import graphql
import hypothesis_graphql
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis_graphql import Mode, nodes

with warnings.catch_warnings():
    # Starlette's TestClient runs the app, lifespan included, in-process and synchronously,
    # which hypothesis needs; its notice about a future httpx2 changes nothing here.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

from backend.api.schema import build_schema
from backend.app import create_app
from backend.graphql.extensions import UNEXPECTED_MESSAGE
from backend.settings import Settings
from tests.factories import Factory, Member

EXAMPLES = 200
URL_CHARS = 8000
# Deterministic for CI: the same examples every run, no deadline on a loaded machine.
FUZZ = hypothesis_settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# What a Python exception, a traceback or a driver leaks into a message.
LEAK = re.compile(
    r"Traceback|File \"|\b[A-Z]\w*(Error|Exception)\b|object has no attribute|NoneType|"
    r"sqlalchemy|sqlite|asyncpg|psycopg|strawberry\.|backend\.|<\w+ object at",
)

# GraphQL's messages quote the schema's names ('UserError') and the client's input.
QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def problems(body: Any) -> list[str]:
    """The errors of a GraphQL response a client must not see."""
    if not isinstance(body, dict):
        return []
    found = []
    for error in body.get("errors") or []:
        message = str(error.get("message", ""))
        if (error.get("extensions") or {}).get("code") or message == UNEXPECTED_MESSAGE:
            continue
        if "path" in error:
            # Raised while fields resolved: only coded or masked errors may get out.
            found.append(f"uncoded field error: {error}")
        elif LEAK.search(QUOTED.sub("''", message)):
            # A parse, validation or variable-coercion message quoting an exception.
            found.append(f"leaked exception text: {error}")
    return found


def check(response: Any) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:2000])
    if "json" in response.headers.get("content-type", ""):
        try:
            body = response.json()
        except ValueError:
            return
        assert not problems(body), problems(body)


def datetime_values() -> st.SearchStrategy[graphql.ValueNode]:
    iso = st.datetimes().map(lambda d: d.isoformat())
    junk = st.text(max_size=40)
    return st.one_of(iso, junk).map(nodes.String)


SCALARS = {"DateTime": datetime_values()}


@pytest.fixture(scope="module")
def sdl() -> str:
    return str(build_schema().as_str())


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
async def member(factory: Factory) -> Member:
    owner = await factory.workspace()
    await factory.contact(owner, "fuzz@client.test", "Fuzz")
    return owner


def headers_for(member: Member | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {member.token}"} if member else {}


def documents(sdl: str) -> st.SearchStrategy[str]:
    """Queries and mutations from the schema, valid ones and (negative mode) broken ones."""
    made: list[st.SearchStrategy[Any]] = [
        hypothesis_graphql.from_schema(sdl, custom_scalars=SCALARS, mode=mode)
        for mode in (Mode.POSITIVE, Mode.NEGATIVE)
    ]
    return st.one_of(made).map(str)


def each_as(member: Member) -> Callable[[bool], Member | None]:
    return lambda signed_in: member if signed_in else None


def test_generated_documents_never_fail_with_a_5xx_or_an_unmasked_error(
    client: TestClient, member: Member, sdl: str
) -> None:
    who = each_as(member)

    @FUZZ
    @given(document=documents(sdl), signed_in=st.booleans())
    def send(document: str, signed_in: bool) -> None:
        check(
            client.post("/graphql", json={"query": document}, headers=headers_for(who(signed_in)))
        )

    send()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = st.sampled_from(["query", "variables", "operationName", "extensions"])
HOSTILE_TEXT = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.sampled_from(["\x00", "{", "}", "\ud800", "é", "$", '"']), max_size=50),
    st.integers(min_value=10_000, max_value=600_000).map(lambda n: "{ viewer { id } }" + " " * n),
    st.integers(min_value=1, max_value=200_000).map(lambda n: "x" * n),
)


def bodies() -> st.SearchStrategy[bytes]:
    objects = st.dictionaries(FIELDS, JSON | HOSTILE_TEXT, max_size=4)
    with_queries = st.fixed_dictionaries(
        {
            "query": st.sampled_from(
                [
                    "{ viewer { user { id } } }",
                    "query($q: String){ contacts(search: $q) { totalCount } }",
                ]
            )
        },
        optional={
            "variables": st.dictionaries(
                st.sampled_from(["q", "id", "first"]), JSON | HOSTILE_TEXT, max_size=3
            ),
            "operationName": JSON,
        },
    )
    as_json = st.one_of(objects, with_queries, JSON).map(lambda value: json.dumps(value).encode())
    raw = st.one_of(
        st.binary(max_size=300),  # mostly invalid UTF-8, or not JSON
        st.binary(max_size=50).map(lambda b: b'{"query": "' + b + b'"}'),
        HOSTILE_TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.just(b'{"query": "{ viewer { id } }\\u0000"}'),
    )
    return st.one_of(as_json, raw)


def test_hostile_bodies_never_fail_with_a_5xx_or_an_unmasked_error(
    client: TestClient, member: Member
) -> None:
    who = each_as(member)

    @FUZZ
    @given(
        body=bodies(),
        signed_in=st.booleans(),
        content_type=st.sampled_from(
            [
                "application/json",
                "application/graphql-response+json",
                "text/plain",
                "application/x-www-form-urlencoded",
            ]
        ),
    )
    def send(body: bytes, signed_in: bool, content_type: str) -> None:
        headers = {**headers_for(who(signed_in)), "Content-Type": content_type}
        check(client.post("/graphql", content=body, headers=headers))

    send()


def test_hostile_query_strings_and_webhook_bodies_never_fail_with_a_5xx(
    client: TestClient, member: Member
) -> None:
    who = each_as(member)

    @FUZZ
    @given(
        query=HOSTILE_TEXT,
        variables=st.one_of(JSON.map(json.dumps), HOSTILE_TEXT),
        body=bodies(),
        signed_in=st.booleans(),
        route=st.sampled_from(
            ["/webhooks/google?token=wrong", "/webhooks/microsoft", "/inbound/mime"]
        ),
    )
    def send(query: str, variables: str, body: bytes, signed_in: bool, route: str) -> None:
        # A URL carries UTF-8 (a lone surrogate is replaced) and stays under 64 KB.
        params = {
            name: value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")[:URL_CHARS]
            for name, value in (("query", query), ("variables", variables))
        }
        check(client.get("/graphql", params=params, headers=headers_for(who(signed_in))))
        check(client.post(route, content=body, headers={"Content-Type": "application/json"}))

    send()


def test_the_fuzz_oracle_tells_leaks_from_graphql_messages() -> None:
    """What the fuzz tests accept: GraphQL's own messages (quoting the schema's names), coded
    and masked errors; what they refuse: exception text and uncoded field errors."""
    fine = {
        "errors": [
            {"message": "Syntax Error: Unexpected character: U+0000.", "locations": []},
            {"message": "Cannot query field 'x' on type 'UserError'.", "locations": []},
            {"message": "Not signed in.", "path": ["viewer"], "extensions": {"code": "X"}},
            {"message": UNEXPECTED_MESSAGE, "path": ["contacts"]},
        ]
    }
    assert problems(fine) == []
    leaks = {
        "errors": [
            {"message": "ValueError: invalid literal for int() with base 10: 'x'"},
            {"message": "'NoneType' object has no attribute 'id'", "path": ["contact"]},
            {"message": "(sqlite3.IntegrityError) UNIQUE constraint failed"},
        ]
    }
    assert len(problems(leaks)) == 3
