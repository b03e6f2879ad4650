"""passwd-file schemes against vectors from doveadm and openssl, plus our own hashes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mailfeed.errors import ConfigError
from mailfeed.passwd import PasswdFile, hash_password, sha_crypt
from mailfeed.scram import ScramCredentials
from tests.support import need

PASSWORD = "pw ü x"
DOVEADM_SCHEMES = [
    "PLAIN", "CLEARTEXT", "PLAIN.B64", "SHA512-CRYPT", "SHA256-CRYPT", "ARGON2ID", "ARGON2I",
    "SCRAM-SHA-256", "SHA256", "SSHA256", "SHA512", "SSHA512",
]  # fmt: skip


def check(line_secret: str, password: str = PASSWORD) -> None:
    passwd = PasswdFile.parse(f"user:{line_secret}:1000:1000::/home/user::\n")
    assert passwd.verify("user", password)
    assert not passwd.verify("user", password + "x")
    assert not passwd.verify("other", password)


@pytest.mark.parametrize("scheme", DOVEADM_SCHEMES)
def test_doveadm_vectors(scheme: str) -> None:
    doveadm = need("doveadm")["doveadm"]
    secret = subprocess.run([doveadm, "pw", "-s", scheme, "-p", PASSWORD], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert secret.startswith("{" + scheme + "}")
    check(secret)


def test_sha512_crypt_rounds_vector() -> None:
    doveadm = need("doveadm")["doveadm"]
    secret = subprocess.run([doveadm, "pw", "-s", "SHA512-CRYPT", "-r", "6000", "-p", "pw"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert "$rounds=6000$" in secret
    check(secret, "pw")


@pytest.mark.parametrize("flag", ["-6", "-5"])
def test_openssl_crypt_vectors(flag: str) -> None:
    openssl = need("openssl")["openssl"]
    secret = subprocess.run([openssl, "passwd", flag, "-salt", "saltsalt", "pw"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert sha_crypt("pw", secret) == secret
    check(secret, "pw")  # no {SCHEME}: Dovecot's default CRYPT


def test_sha_crypt_spec_vector() -> None:
    # First test vector of the SHA-crypt specification.
    assert sha_crypt("Hello world!", "$6$saltstring") == (
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJu"
        "esI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
    )


@pytest.mark.parametrize(
    "scheme", ["ARGON2ID", "ARGON2I", "SHA512-CRYPT", "SHA256-CRYPT", "SCRAM-SHA-256", "PLAIN",
               "SSHA512", "SHA256"]
)
def test_hash_password_verifies_here_and_in_doveadm(scheme: str) -> None:
    secret = hash_password(PASSWORD, scheme)
    check(secret)
    doveadm = need("doveadm")["doveadm"]
    result = subprocess.run([doveadm, "pw", "-t", secret, "-p", PASSWORD], capture_output=True,
                            text=True, check=False)
    assert "(verified)" in result.stdout, result.stderr


def test_plain_password_with_colon_is_encoded() -> None:
    secret = hash_password("a:b", "PLAIN")
    assert secret == "{PLAIN.B64}YTpi"
    check(secret, "a:b")
    assert PasswdFile.parse(f"u:{secret}\n").plain_secret("u") == "a:b"


def test_scram_credentials_and_plain_secret() -> None:
    scram = hash_password("pw", "SCRAM-SHA-256")
    passwd = PasswdFile.parse(f"a:{{PLAIN}}pw\nb:{scram}\nc:{hash_password('pw')}\n")
    derived = passwd.scram_credentials("a")
    assert derived is not None
    assert derived.stored_key == ScramCredentials.from_password(
        "pw", salt=derived.salt, iterations=derived.iterations
    ).stored_key
    assert passwd.scram_credentials("b") == ScramCredentials.parse(scram.split("}", 1)[1])
    assert passwd.scram_credentials("c") is None
    assert passwd.scram_credentials("nobody") is None
    assert passwd.plain_secret("a") == "pw"
    assert passwd.plain_secret("b") is None
    assert passwd.plain_secret("nobody") is None


def test_unknown_user_checks_a_decoy_of_the_same_scheme() -> None:
    passwd = PasswdFile.parse(f"a:{hash_password('pw', 'SHA512-CRYPT')}\n")
    assert passwd._decoy.scheme == "SHA512-CRYPT"
    assert not passwd.verify("nobody", "pw")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:{MD5-CRYPT}$1$x$y\n", "unsupported password scheme 'MD5-CRYPT'"),
        ("a:{PLAIN}x\na:{PLAIN}y\n", "listed twice"),
        ("justaname\n", "expected user"),
        ("a:$1$salt$hash\n", "only \\$6\\$"),
    ],
)
def test_invalid_lines_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PasswdFile.parse(text, "users")


def test_load_reads_file_and_skips_comments(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# comment\n\nsite1:{PLAIN}pw::::::\nempty:::\n")
    passwd = PasswdFile.load(path)
    assert passwd.verify("site1", "pw")
    assert not passwd.verify("empty", "")
    with pytest.raises(ConfigError, match="not found"):
        PasswdFile.load(tmp_path / "missing")
