"""Enrollment tokens: one line that round-trips, refuses every defect with one
clear InvalidToken message, is worthless once any character changes, and never
shows its secret."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore.errors import InvalidInput, InvalidToken
from meshcore.tokens import PREFIX, EnrollmentToken, hash_matches, new_token, parse_token, token_hash

FINGERPRINT = "3f" * 32
URL = "https://ctl.acme.mesh:8443"


def line_of(doc: object) -> str:
    """A token line with any JSON body, as a forger would write it."""
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def fields(**overrides: object) -> dict[str, object]:
    token = new_token(URL, FINGERPRINT)
    doc: dict[str, object] = {"u": token.url, "f": token.ca_fingerprint, "i": token.id, "s": token.secret}
    doc.update(overrides)
    return doc


@pytest.mark.parametrize(
    "url", [URL, "https://10.0.0.1:8443", "https://[::1]:8443", "https://ctl.acme.mesh", "https://ctl:443/base/path"]
)
def test_token_round_trips_through_its_line(url: str) -> None:
    token = new_token(url, FINGERPRINT)
    line = token.encode()
    assert line.startswith("idm1.") and "=" not in line and "\n" not in line
    assert parse_token(line) == token
    assert parse_token(f"  {line}\n") == token  # pasted with whitespace


def test_new_tokens_are_unique_and_well_formed() -> None:
    tokens = [new_token(URL, FINGERPRINT) for _ in range(200)]
    assert len({t.id for t in tokens}) == len({t.secret for t in tokens}) == 200
    assert all(len(t.secret) >= 43 for t in tokens)  # 256 bits of randomness


GARBAGE = {
    "empty": "",
    "words": "hello world",
    "prefix only": "idm1.",
    "not base64": "idm1.!!!!****",
    "base64 of junk": "idm1." + base64.urlsafe_b64encode(b"\x00\xff junk").decode(),
    "json list": line_of(["u", "f", "i", "s"]),
    "json string": line_of("token"),
    "json number": line_of(7),
    "missing secret": line_of({k: v for k, v in fields().items() if k != "s"}),
    "too long": "idm1." + "A" * 3000,
}


@pytest.mark.parametrize("text", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_refused_with_one_clear_line(text: str) -> None:
    with pytest.raises(InvalidToken) as refused:
        parse_token(text)
    message = str(refused.value)
    assert "\n" not in message
    assert "not an idmesh enrollment token" in message or "damaged" in message


def test_truncated_token_is_refused_as_damaged() -> None:
    line = new_token(URL, FINGERPRINT).encode()
    for cut in range(len(PREFIX) + 1, len(line), 7):
        with pytest.raises(InvalidToken, match="damaged"):
            parse_token(line[:cut])


@pytest.mark.parametrize("prefix", ["idm2.", "IDM1.", "idm1", "xidm1.", "idm1:"])
def test_wrong_prefix_is_refused(prefix: str) -> None:
    line = new_token(URL, FINGERPRINT).encode()
    with pytest.raises(InvalidToken, match="it should start with 'idm1.'"):
        parse_token(prefix + line[len(PREFIX) :])


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://ctl.acme.mesh:8443", "names no https controller URL"),
        ("ftp://ctl.acme.mesh", "names no https controller URL"),
        ("ctl.acme.mesh:8443", "names no https controller URL"),
        ("https://", "names no https controller URL"),
        ("https:///path", "names no https controller URL"),
        ("", "names no https controller URL"),
        ("https://[::1", "names no valid controller URL"),
        ("https://ctl.acme.mesh:99999", "names no valid controller URL"),
        ("https://ctl.acme.mesh:port", "names no valid controller URL"),
    ],
)
def test_url_that_is_not_https_to_a_host_is_refused(url: str, message: str) -> None:
    with pytest.raises(InvalidToken, match=message):
        parse_token(line_of(fields(u=url)))


@pytest.mark.parametrize(
    "fp",
    ["", "3f" * 31, "3f" * 33, "3F" * 32, "zz" * 32, "3f:" * 31 + "3f", "3f" * 32 + "\n", " " + "3f" * 32],
)
def test_malformed_fingerprint_is_refused(fp: str) -> None:
    with pytest.raises(InvalidToken, match="malformed CA fingerprint"):
        parse_token(line_of(fields(f=fp)))


@pytest.mark.parametrize(
    "override",
    [
        {"i": "short"},
        {"i": "has space in it"},
        {"i": "abcdefgh1234\n"},
        {"s": "too-short"},
        {"s": "x" * 65},
        {"s": "!" * 40},
    ],
)
def test_malformed_id_or_secret_is_refused(override: dict[str, str]) -> None:
    with pytest.raises(InvalidToken, match="malformed id or secret"):
        parse_token(line_of(fields(**override)))


@pytest.mark.parametrize("key", ["u", "f", "i", "s"])
def test_fields_of_the_wrong_type_are_refused(key: str) -> None:
    with pytest.raises(InvalidToken, match="damaged"):
        parse_token(line_of(fields(**{key: 12345})))


def test_invalid_token_is_invalid_input() -> None:
    assert issubclass(InvalidToken, InvalidInput)


@pytest.mark.parametrize(
    "change",
    [
        {"url": "https://evil.example:8443"},
        {"url": URL + "/"},
        {"ca_fingerprint": "40" * 32},
        {"id": "another-id-01"},
        {"secret": "A" * 43},
    ],
    ids=["url", "url-slash", "fingerprint", "id", "secret"],
)
def test_tampering_any_field_makes_the_token_worthless(change: dict[str, Any]) -> None:
    token = new_token(URL, FINGERPRINT)
    stored = token_hash(token.encode())
    tampered = dataclasses.replace(token, **change).encode()
    assert parse_token(tampered) != token
    assert token_hash(tampered) != stored
    assert not hash_matches(tampered, stored)
    assert hash_matches(token.encode(), stored)
    assert hash_matches(f" {token.encode()}\n", stored)


ORIGINAL = new_token(URL, FINGERPRINT).encode()


@given(st.integers(min_value=0, max_value=len(ORIGINAL) - 1), st.characters(codec="ascii"))
def test_changing_any_character_changes_the_hash(position: int, char: str) -> None:
    tampered = ORIGINAL[:position] + char + ORIGINAL[position + 1 :]
    if tampered.strip() != ORIGINAL:
        assert not hash_matches(tampered, token_hash(ORIGINAL))


def test_token_hash_is_sha256_of_the_stripped_line() -> None:
    import hashlib

    assert token_hash(" idm1.abc \n") == hashlib.sha256(b"idm1.abc").digest()
    assert len(token_hash(ORIGINAL)) == 32


def test_repr_never_shows_the_secret() -> None:
    token = new_token(URL, FINGERPRINT)
    for shown in (repr(token), str(token), f"{token}", f"{token!r}", repr([token]), repr({"t": token})):
        assert token.secret not in shown
        assert token.id in shown and token.url in shown
    assert token.encode() not in repr(token)


def test_equal_tokens_compare_equal() -> None:
    token = new_token(URL, FINGERPRINT)
    assert EnrollmentToken(token.url, token.ca_fingerprint, token.id, token.secret) == token


# -- several controller replicas (SPEC §8) -------------------------------------------------------------------------
URLS = (URL, "https://ctl-2.acme.mesh:8443", "https://10.0.0.3:8443")


def body_of(line: str) -> dict[str, object]:
    body = line[len(PREFIX) :]
    doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert isinstance(doc, dict)
    return doc


def test_a_token_for_several_controllers_round_trips_with_every_url_in_order() -> None:
    token = new_token(URL, FINGERPRINT, URLS)
    parsed = parse_token(token.encode())
    assert parsed == token
    assert parsed.url == URL and parsed.urls == URLS


def test_a_multi_controller_token_keeps_the_first_url_in_u_for_an_older_meshd() -> None:
    doc = body_of(new_token(URL, FINGERPRINT, URLS).encode())
    assert doc["u"] == URL and doc["us"] == list(URLS)


def test_a_single_controller_token_is_encoded_as_before_without_us() -> None:
    for token in (new_token(URL, FINGERPRINT), new_token(URL, FINGERPRINT, [URL])):
        assert "us" not in body_of(token.encode())
        assert token.urls == (URL,)


def test_an_old_single_url_token_parses_with_its_url_as_the_whole_list() -> None:
    old = parse_token(line_of(fields()))  # what every earlier controller wrote: no "us"
    assert old.urls == (old.url,) == (URL,)


def test_the_token_url_always_leads_the_list_once() -> None:
    token = new_token(URL, FINGERPRINT, [URLS[1], URL, URLS[1], URLS[2]])
    assert token.urls == URLS[:1] + (URLS[1], URLS[2])


@pytest.mark.parametrize(
    "listed",
    [
        "https://ctl-2.acme.mesh:8443",  # a string, not a list
        {"0": URL},
        [],
        [URL, 12345],
        [URL, None],
        [URLS[1], URL],  # "u" not first
        [URL, URLS[1], URLS[1]],  # a duplicate
    ],
    ids=["string", "object", "empty", "number", "null", "u-not-first", "duplicate"],
)
def test_a_malformed_controller_list_is_refused_as_damaged(listed: object) -> None:
    with pytest.raises(InvalidToken, match="damaged: its list of controller URLs is malformed"):
        parse_token(line_of(fields(us=listed)))


def test_every_listed_controller_url_must_be_https_to_a_host() -> None:
    with pytest.raises(InvalidToken, match="names no https controller URL"):
        parse_token(line_of(fields(us=[URL, "http://ctl-2.acme.mesh:8443"])))
    with pytest.raises(InvalidToken, match="names no valid controller URL"):
        parse_token(line_of(fields(us=[URL, "https://ctl-2:99999"])))


def test_changing_the_controller_list_makes_the_token_worthless() -> None:
    token = new_token(URL, FINGERPRINT, URLS)
    stored = token_hash(token.encode())
    for urls in (URLS[:2], (*URLS, "https://evil.example:8443"), (URL, URLS[2], URLS[1])):
        assert not hash_matches(dataclasses.replace(token, urls=urls).encode(), stored)


def test_repr_of_a_multi_controller_token_names_them_and_never_the_secret() -> None:
    token = new_token(URL, FINGERPRINT, URLS)
    assert all(url in repr(token) for url in URLS) and token.secret not in repr(token)
