"""Properties of the identity service's parsers: whatever comes in, either a well-formed value
or a Matrix error, never another exception; valid input is accepted and normalized."""

from __future__ import annotations

import argparse
import string
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teia.errors import ConfigError, MatrixError
from teia.homeserver.identity import (
    MAX_LOOKUP_ADDRESSES,
    lookup_hash,
    parse_client_secret,
    parse_email,
    parse_lookup,
    parse_send_attempt,
    parse_sid,
)
from teia.homeserver.service import HomeserverConfig
from teia.service import add_arguments, load

T = TypeVar("T")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

_LOCAL = st.text(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~", min_size=1,
                 max_size=20)  # fmt: skip
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9\-]{0,10}[a-z0-9])?", fullmatch=True)
valid_addresses = st.builds(
    lambda local, labels: f"{local}@{'.'.join(labels)}",
    st.lists(_LOCAL, min_size=1, max_size=3).map(".".join),
    st.lists(_LABEL, min_size=1, max_size=4),
).filter(lambda a: len(a) <= 254 and len(a.rpartition("@")[0]) <= 64)


def outcome(parse: Callable[..., T], *args: Any) -> T | MatrixError:
    """What ``parse`` answers: its value, or the Matrix error it raised."""
    try:
        return parse(*args)
    except MatrixError as exc:
        return exc


@given(st.one_of(st.text(max_size=300), json_values))
def test_parse_email_is_total(value: Any) -> None:
    address = outcome(parse_email, value)
    if isinstance(address, MatrixError):
        assert (address.status, address.errcode) == (400, "M_INVALID_EMAIL")
        return
    assert address.isascii()
    assert address == address.lower()
    assert address.count("@") == 1
    assert not any(c.isspace() or ord(c) < 32 for c in address)
    assert len(address) <= 254
    assert parse_email(address) == address  # normal form is a fixed point


@given(valid_addresses)
def test_valid_addresses_are_accepted_lowercased(address: str) -> None:
    assert parse_email(address) == address.lower()
    assert parse_email(address.upper()) == address.lower()


@pytest.mark.parametrize(
    "bad",
    ["", "@example.org", "a@", "a@@b.org", "a..b@c.org", ".a@b.org", "a.@b.org", "a b@c.org",
     "a@-b.org", "a@b-.org", "a@b..org", "a@b.org.", "é@b.org", "a@b\n.org", "a@b.org\n",
     "a@" + "b" * 64 + ".org", "a" * 65 + "@b.org", 7, None, ["a@b.org"]],
)  # fmt: skip
def test_parse_email_refuses(bad: Any) -> None:
    with pytest.raises(MatrixError) as info:
        parse_email(bad)
    assert info.value.errcode == "M_INVALID_EMAIL"


@given(st.one_of(st.text(max_size=300), json_values))
def test_secret_and_sid_parsers_are_total(value: Any) -> None:
    for parse in (parse_client_secret, parse_sid):
        parsed = outcome(parse, value)
        if isinstance(parsed, MatrixError):
            assert parsed.errcode == "M_INVALID_PARAM"
            continue
        assert parsed == value
        assert 1 <= len(parsed) <= 255
        assert set(parsed) <= set(string.ascii_letters + string.digits + ".=_-")


@given(st.one_of(st.text(max_size=30), json_values))
def test_parse_send_attempt_is_total(value: Any) -> None:
    attempt = outcome(parse_send_attempt, value)
    if isinstance(attempt, MatrixError):
        assert attempt.errcode == "M_INVALID_PARAM"
        return
    assert isinstance(attempt, int)
    assert not isinstance(attempt, bool)
    assert 0 <= attempt < 2**53


_hashes = st.builds(lambda a: lookup_hash(a, "email", "pepper"), st.text(max_size=40))


@given(st.one_of(json_values, st.fixed_dictionaries(
    {"algorithm": st.sampled_from(["sha256", "none", 3]),
     "pepper": st.sampled_from(["pepper", "other", None]),
     "addresses": st.one_of(st.lists(_hashes | st.text(max_size=50), max_size=5), json_values)},
)))  # fmt: skip
def test_parse_lookup_is_total(body: Any) -> None:
    hashes = outcome(parse_lookup, body, "pepper")
    if isinstance(hashes, MatrixError):
        assert hashes.status == 400
        assert hashes.errcode in ("M_BAD_JSON", "M_MISSING_PARAMS", "M_INVALID_PARAM",
                                  "M_INVALID_PEPPER")  # fmt: skip
        if hashes.errcode == "M_INVALID_PEPPER":
            assert hashes.extra["lookup_pepper"] == "pepper"
        return
    assert body["algorithm"] == "sha256"
    assert body["pepper"] == "pepper"
    assert len(hashes) == len(set(hashes)) <= MAX_LOOKUP_ADDRESSES
    assert all(len(h) == 43 for h in hashes)


@given(st.lists(_hashes, max_size=20))
def test_parse_lookup_keeps_valid_hashes_in_order(hashes: list[str]) -> None:
    body = {"algorithm": "sha256", "pepper": "pepper", "addresses": hashes}
    assert parse_lookup(body, "pepper") == list(dict.fromkeys(hashes))


def test_lookup_hash_matches_the_spec_example() -> None:
    # The Matrix identity service spec's worked example.
    assert lookup_hash("alice@example.com", "email", "matrixrocks") == (
        "4kenr7N9drpCJ4AfalmlGQVsOn3o2RHjkADUpXJWZUc"
    )


def test_identity_settings_are_checked(tmp_path: Any) -> None:
    for bad in (["--identity-delivery", "pigeon"], ["--smtp-port", "0"],
                ["--identity-public-url", "ftp://x"], ["--smtp-password-file", "/x"]):  # fmt: skip
        parser = argparse.ArgumentParser()
        add_arguments(parser, HomeserverConfig)
        with pytest.raises(ConfigError):
            load(HomeserverConfig, parser.parse_args(["--data-dir", str(tmp_path), *bad]))
