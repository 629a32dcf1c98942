"""Scopes: parsing, `within`, and attenuation (a child never gains a scope)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.errors import InvalidInput
from meshcore.scopes import Scope, parse_scope, parse_scopes, scope_within, scopes_within


@pytest.mark.parametrize(
    "text, expected",
    [
        ("db:read", Scope("db", "read")),
        ("web:*", Scope("web", "*")),
        ("*:read", Scope("*", "read")),
        ("*:*", Scope("*", "*")),
        ("a.b-c_9:x", Scope("a.b-c_9", "x")),
        ("0:1", Scope("0", "1")),
        ("r" * 63 + ":a", Scope("r" * 63, "a")),
    ],
)
def test_parse_scope_accepts_resource_action(text: str, expected: Scope) -> None:
    assert parse_scope(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "db",
        ":",
        "db:",
        ":read",
        "db:read:extra",
        "DB:read",
        "db:Read",
        "db :read",
        "db: read",
        " db:read",
        "db:read\n",
        "db\n:read",
        "-db:read",
        ".db:read",
        "_db:read",
        "d*:read",
        "db:re*",
        "**:read",
        "db/x:read",
        "r" * 64 + ":a",
        "dé:read",
    ],
)
def test_parse_scope_refuses_malformed_scopes_with_a_clear_message(text: str) -> None:
    with pytest.raises(InvalidInput, match="expected resource:action, each a lower-case name or '\\*'") as refused:
        parse_scope(text)
    assert "\n" not in str(refused.value).replace(repr(text), "")


def test_parse_scopes_deduplicates_and_sorts() -> None:
    assert parse_scopes(["web:*", "db:read", "db:read", "*:*"]) == (
        Scope("*", "*"),
        Scope("db", "read"),
        Scope("web", "*"),
    )
    assert parse_scopes([]) == ()


def test_parse_scopes_refuses_the_whole_list_for_one_bad_scope() -> None:
    with pytest.raises(InvalidInput, match="'db'"):
        parse_scopes(["web:*", "db"])


@pytest.mark.parametrize(
    "child, parent, within",
    [
        ("db:read", "db:read", True),
        ("db:read", "db:*", True),
        ("db:read", "*:read", True),
        ("db:read", "*:*", True),
        ("db:*", "*:*", True),
        ("*:read", "*:*", True),
        ("db:*", "db:read", False),  # a wildcard child is wider than a named parent
        ("*:read", "db:read", False),
        ("*:*", "db:*", False),
        ("db:read", "db:write", False),
        ("db:read", "web:read", False),
        ("db:read", "web:*", False),
        ("db:write", "*:read", False),
    ],
)
def test_scope_within(child: str, parent: str, within: bool) -> None:
    assert parse_scope(child).within(parse_scope(parent)) is within


def test_scopes_within_is_the_attenuation_check() -> None:
    parent = parse_scopes(["db:read", "web:*"])
    assert scopes_within(parse_scopes(["db:read", "web:deploy"]), parent)
    assert scopes_within((), parent)
    assert not scopes_within(parse_scopes(["db:write"]), parent)
    assert not scopes_within(parse_scopes(["web:deploy", "db:*"]), parent)
    assert not scopes_within(parse_scopes(["db:read"]), ())


def test_scopes_within_accepts_one_shot_iterables() -> None:
    children = (s for s in parse_scopes(["db:read", "web:deploy"]))
    parents = (s for s in parse_scopes(["db:read", "web:*"]))
    assert scopes_within(children, parents)


def test_scope_within_any_parent() -> None:
    assert scope_within(Scope("db", "read"), [Scope("web", "*"), Scope("db", "*")])
    assert not scope_within(Scope("db", "read"), [])


# A small alphabet makes equal and overlapping segments common.
_names = st.sampled_from(["db", "web", "read", "write", "deploy", "a.b-c_9"])
segments = st.one_of(st.just("*"), _names)
scopes = st.builds(Scope, segments, segments)
concrete_scopes = st.builds(Scope, _names, _names)
scope_sets = st.lists(scopes, max_size=5)


@given(scopes)
def test_within_is_reflexive(s: Scope) -> None:
    assert s.within(s)


@given(scopes, scopes, scopes)
def test_within_is_transitive(a: Scope, b: Scope, c: Scope) -> None:
    if a.within(b) and b.within(c):
        assert a.within(c)


@given(scopes, scopes)
def test_within_is_antisymmetric(a: Scope, b: Scope) -> None:
    if a.within(b) and b.within(a):
        assert a == b


@given(scopes)
def test_star_star_covers_every_scope(s: Scope) -> None:
    assert s.within(Scope("*", "*"))
    assert scopes_within([s], parse_scopes(["*:*"]))


@given(scope_sets, scope_sets, concrete_scopes)
def test_a_child_never_gains_a_scope_its_parent_lacks(
    children: list[Scope], parents: list[Scope], request: Scope
) -> None:
    """If the attenuation check passes, every concrete request a child allows
    is also allowed by the parent."""
    if scopes_within(children, parents) and scope_within(request, children):
        assert scope_within(request, parents)


@given(scope_sets, scope_sets, scope_sets)
def test_attenuation_chains(grandchildren: list[Scope], children: list[Scope], parents: list[Scope]) -> None:
    if scopes_within(grandchildren, children) and scopes_within(children, parents):
        assert scopes_within(grandchildren, parents)


@given(scope_sets)
def test_a_set_is_within_itself_and_its_subsets_are_too(s: list[Scope]) -> None:
    assert scopes_within(s, s)
    assert scopes_within(s[: len(s) // 2], s)


@given(st.from_regex(r"(\*|[a-z0-9][a-z0-9._-]{0,62}):(\*|[a-z0-9][a-z0-9._-]{0,62})", fullmatch=True))
def test_every_valid_scope_round_trips_through_text(text: str) -> None:
    assert str(parse_scope(text)) == text
