"""SCRAM-SHA-256 against the RFC 7677 section 3 example and itself."""

from __future__ import annotations

import pytest

from mailfeed.scram import ScramClient, ScramCredentials, ScramError, ScramServer

RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_client_matches_rfc_7677_example() -> None:
    client = ScramClient("user", "pencil", nonce=RFC_CLIENT_NONCE)
    assert client.first() == "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert client.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.check(RFC_SERVER_FINAL)


def test_client_rejects_false_server_signature() -> None:
    client = ScramClient("user", "pencil", nonce=RFC_CLIENT_NONCE)
    client.final(RFC_SERVER_FIRST)
    with pytest.raises(ScramError):
        client.check("v=" + "A" * 44)


def test_server_and_client_agree() -> None:
    creds = ScramCredentials.from_password("s3cret")
    server = ScramServer(lambda name: creds if name == "site,1" else None)
    client = ScramClient("site,1", "s3cret")
    reply = server.final(client.final(server.first(client.first())))
    client.check(reply)
    assert server.username == "site,1"


def test_server_rejects_wrong_password() -> None:
    creds = ScramCredentials.from_password("s3cret")
    server = ScramServer(lambda name: creds)
    client = ScramClient("site1", "wrong")
    with pytest.raises(ScramError):
        server.final(client.final(server.first(client.first())))


def test_unknown_user_fails_like_wrong_password() -> None:
    server = ScramServer(lambda name: None)
    client = ScramClient("nobody", "x")
    challenge = server.first(client.first())
    assert challenge.startswith("r=")
    with pytest.raises(ScramError, match="authentication failed"):
        server.final(client.final(challenge))


def test_credentials_round_trip_dovecot_form() -> None:
    creds = ScramCredentials.from_password("pw", salt=b"0123456789abcdef", iterations=4096)
    assert ScramCredentials.parse(creds.format()) == creds
