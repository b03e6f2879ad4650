"""The [mx] table, the domain map and the SMTP receiver's pure helpers."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailfeed.errors import ConfigError
from mailfeed.mxconfig import ListenAddress, MxLimits, mx_config_from
from mailfeed.smtpserver import (
    build_received,
    check_recipient,
    find_bare_newline,
    recipient_key,
)


def load(text: str, path: str = "/etc/mailfeed/mx.toml"):  # type: ignore[no-untyped-def]
    return mx_config_from(path, tomllib.loads(text))


SITES = """
[sites.site1]
domains = ["Example.ORG", "bücher.example"]
addresses = ["boss@example.com"]

[sites.site2]
domains = ["example.com"]
"""


def test_defaults() -> None:
    config = load(SITES)
    assert config.smtp_listen == (ListenAddress("127.0.0.1", 25),)
    assert config.pop3_listen == (ListenAddress("127.0.0.1", 110),)
    assert config.pop3s_listen == ()
    assert config.passwd_file == Path("/etc/mailfeed/passwd")
    assert config.allow_plaintext_auth is False
    assert config.limits == MxLimits()


def test_listen_addresses_parsed() -> None:
    config = load('[mx]\nsmtp_listen = ["0.0.0.0:2525", "[::1]:0"]\npop3_listen = []\n')
    assert config.smtp_listen == (ListenAddress("0.0.0.0", 2525), ListenAddress("::1", 0))
    assert str(config.smtp_listen[1]) == "[::1]:0"
    assert config.pop3_listen == ()


@pytest.mark.parametrize("value", ['"127.0.0.1:25"', '["127.0.0.1"]', '["host:99999"]', '[":25"]'])
def test_bad_listen_address_named(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(f"[mx]\nsmtp_listen = {value}\n")
    assert "/etc/mailfeed/mx.toml: mx.smtp_listen" in str(caught.value)


def test_pop3s_needs_tls() -> None:
    with pytest.raises(ConfigError, match=r"mx\.pop3s_listen .*needs tls_cert"):
        load('[mx]\npop3s_listen = ["127.0.0.1:995"]\n')


def test_tls_cert_needs_key() -> None:
    with pytest.raises(ConfigError, match=r"mx\.tls_cert = 'c\.pem': tls_cert and tls_key"):
        load('[mx]\ntls_cert = "c.pem"\n')


def test_tls_enables_pop3s_default() -> None:
    config = load('[mx]\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')
    assert config.pop3s_listen == (ListenAddress("127.0.0.1", 995),)
    assert config.tls_cert == Path("/etc/mailfeed/c.pem")


def test_unknown_key_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting mx\.max_conections"):
        load("[mx]\nmax_conections = 5\n")


def test_limit_out_of_range_named() -> None:
    with pytest.raises(ConfigError, match=r"mx\.max_errors = 0: expected an integer"):
        load("[mx]\nmax_errors = 0\n")


def test_domain_claimed_twice() -> None:
    text = SITES + '\n[sites.site3]\ndomains = ["example.org"]\n'
    with pytest.raises(ConfigError) as caught:
        load(text)
    message = str(caught.value)
    assert "sites.site3.domains" in message
    assert "already claimed by site 'site1'" in message


def test_address_claimed_twice() -> None:
    text = SITES + '\n[sites.site3]\naddresses = ["BOSS@example.com"]\n'
    with pytest.raises(ConfigError, match=r"address 'boss@example\.com' is already claimed"):
        load(text)


def test_routing_exact_address_wins() -> None:
    routing = load(SITES).routing
    assert routing.site_for("boss@EXAMPLE.com").name == "site1"  # type: ignore[union-attr]
    assert routing.site_for("other@example.com").name == "site2"  # type: ignore[union-attr]
    assert routing.site_for("x@example.org").name == "site1"  # type: ignore[union-attr]
    assert routing.site_for("x@xn--bcher-kva.example").name == "site1"  # type: ignore[union-attr]
    assert routing.site_for("x@BÜCHER.example").name == "site1"  # type: ignore[union-attr]
    assert routing.site_for("x@sub.example.org") is None
    assert routing.site_for("x@example.org.") is None
    assert routing.site_for("example.org") is None


@pytest.mark.parametrize(
    ("address", "raw", "site"),
    [
        ("bob@example.org", "<bob@example.org>", "site1"),
        ("bob@example.org", " <@a.example:bob@example.org>", None),
        ("a%b@example.org", "<a%b@example.org>", None),
        ("a!b@example.org", "<a!b@example.org>", None),
        ('"a@b"@example.org', '<"a@b"@example.org>', None),
        ("postmaster", "<postmaster>", None),
        ("bob@[192.0.2.1]", "<bob@[192.0.2.1]>", None),
    ],
)
def test_check_recipient(address: str, raw: str, site: str | None) -> None:
    result = check_recipient(load(SITES).routing, address, raw)
    assert (result.name if result else None) == site


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"a\r\nb\r\n", -1),
        (b"", -1),
        (b"a\nb\r\n", 1),
        (b"a\r\nb\r", 4),
        (b"\n", 0),
        (b"a\r\r\n", 1),
    ],
)
def test_find_bare_newline(data: bytes, offset: int) -> None:
    assert find_bare_newline(data) == offset


def test_received_field_exact() -> None:
    field = build_received(
        helo="client.example.net\x07",
        peer_ip="192.0.2.1",
        hostname="mx.example.net",
        protocol="ESMTPS",
        queue_id="Q9",
        session_id="abcd",
        tls="TLSv1.3 cipher TLS_AES_256_GCM_SHA384 (256 bits)",
        recipient=None,
        date=datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC),
    )
    assert field == (
        b"Received: from client.example.net? ([192.0.2.1])\r\n"
        b"\tby mx.example.net (mailfeed) with ESMTPS id Q9\r\n"
        b"\t(session abcd; TLSv1.3 cipher TLS_AES_256_GCM_SHA384 (256 bits));"
        b" Sat, 03 Feb 2024 04:05:06 +0000\r\n"
    )


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("bob@example.org", "bob@example.org", True),
        ("bob@example.org", "bob@EXAMPLE.ORG", True),
        ("Bob@EXAMPLE.org", "bob@example.org", False),
        ('"a@b"@example.org', '"a@b"@Example.org', True),
        ('"A@b"@example.org', '"a@b"@example.org', False),
    ],
)
def test_recipient_key_keeps_local_part_case(first: str, second: str, same: bool) -> None:
    assert (recipient_key(first) == recipient_key(second)) is same
