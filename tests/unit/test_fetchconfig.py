"""Tests for mailfeed.fetchconfig: defaults, every error names file, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailfeed.errors import ConfigError
from mailfeed.fetchconfig import load_fetch_config, parse_fetch_config
from mailfeed.pop3client import TlsMode

MINIMAL = {
    "state": "/var/lib/mailfeed/fetch.sqlite",
    "quarantine": "/var/lib/mailfeed/quarantine",
    "local_domains": ["Example.ORG."],
    "delivery": "smtp://127.0.0.1:10025",
    "source": [{"name": "mx1", "host": "mx.example.net", "user": "site1", "password": "pw"}],
}


def with_changes(**changes: object) -> dict[str, object]:
    data = {key: value for key, value in MINIMAL.items()}
    data.update(changes)
    return data


def test_defaults() -> None:
    config = parse_fetch_config("/etc/site.toml", MINIMAL)
    source = config.sources[0]
    assert source.tls is TlsMode.IMPLICIT
    assert source.port == 995
    assert source.verify is True
    assert config.local_domains == ("example.org",)
    assert config.is_local("bob@EXAMPLE.org")
    assert not config.is_local("bob@example.net")
    assert config.allowed_above_block == frozenset()
    assert config.limits.max_recipients >= 1200
    assert config.daemon.interval == 300


def test_retrieve_limits() -> None:
    assert parse_fetch_config("/etc/site.toml", MINIMAL).limits.max_retrieve_attempts == 5
    assert parse_fetch_config("/etc/site.toml", MINIMAL).limits.timeouts.message == 600
    data = with_changes(limits={"max_retrieve_attempts": 2, "timeouts": {"message": 30}})
    limits = parse_fetch_config("/etc/site.toml", data).limits
    assert (limits.max_retrieve_attempts, limits.timeouts.message) == (2, 30)


def test_starttls_default_port() -> None:
    source = dict(MINIMAL["source"][0], tls="starttls")  # type: ignore[index]
    config = parse_fetch_config("/etc/site.toml", with_changes(source=[source]))
    assert config.sources[0].port == 110


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"limits": {"max_line_length": "big"}}, "limits.max_line_length = 'big'"),
        ({"limits": {"max_recipents": 5}}, "unknown setting limits.max_recipents"),
        ({"local_domains": []}, "local_domains"),
        ({"delivery": None}, "delivery: missing"),
        ({"source": [{"name": "mx1", "host": "h", "user": "u", "password": "p",
                      "tls": "ssl"}]}, "source[0].tls = 'ssl'"),
        ({"source": [{"name": "mx1", "host": "h", "user": "u"}]}, "password"),
        ({"source": [{"name": "a", "host": "h", "user": "u", "password": "p"},
                     {"name": "a", "host": "h", "user": "u", "password": "p"}]},
         "source[1].name = 'a': used twice"),
        ({"daemon": {"interval": 600, "backoff_max": 60}}, "daemon.backoff_max = 60"),
        ({"allowed_above_block": ["Return Path"]}, "allowed_above_block"),
        ({"limits": {"max_retrieve_attempts": 0}}, "limits.max_retrieve_attempts = 0"),
        ({"limits": {"timeouts": {"message": 0}}}, "limits.timeouts.message = 0"),
    ],
)
def test_errors_name_key_and_value(changes: dict[str, object], expected: str) -> None:
    data = with_changes(**changes)
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(ConfigError) as info:
        parse_fetch_config("/etc/site.toml", data)
    assert "/etc/site.toml" in str(info.value)
    assert expected in str(info.value)


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    source = {"name": "mx1", "host": "h", "user": "u", "password_file": "pass"}
    site = tmp_path / "site.toml"
    site.write_text(
        'state = "s.db"\nquarantine = "q"\nlocal_domains = ["example.org"]\n'
        'delivery = "maildir:/srv/mail"\n[[source]]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in source.items()))
    config = load_fetch_config(site)
    assert config.sources[0].password == "s3cret"
    assert config.state == tmp_path / "s.db"
    assert "s3cret" not in repr(config)
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_fetch_config(site)


@pytest.mark.parametrize("name", ["..", ".", ".hidden"])
def test_source_name_cannot_leave_quarantine(name: str) -> None:
    # The name is a directory under the quarantine root.
    source = {"name": name, "host": "h", "user": "u", "password": "p"}
    with pytest.raises(ConfigError) as info:
        parse_fetch_config("/etc/site.toml", with_changes(source=[source]))
    assert f"source[0].name = {name!r}" in str(info.value)


SECRET = "TopSecretPW"


def write_site(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    site = tmp_path / "site.toml"
    site.write_text(
        f'state = "{tmp_path}/s.db"\nquarantine = "{tmp_path}/q"\n'
        'local_domains = ["example.org"]\ndelivery = "maildir:/srv/mail"\n' + text)
    site.chmod(mode)
    return site


SOURCE = '[[source]]\nname = "mx1"\nhost = "h"\nuser = "u"\n'


@pytest.mark.parametrize(
    "changes",
    [
        # [source] instead of [[source]]: the whole table is shown.
        {"source": {"name": "mx1", "host": "h", "user": "u", "password": SECRET}},
        {"source": [{"name": "mx1", "host": "h", "user": "u", "password": 12345}]},
        {"source": [{"name": "mx1", "host": "h", "user": "u", "password": SECRET,
                     "verify": "yes"}]},
        {"extra": {"db_password": SECRET, "api_secret": SECRET}},
    ],
)
def test_errors_mask_secrets(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fetch_config("/etc/site.toml", with_changes(**changes))
    message = str(info.value)
    assert SECRET not in message
    assert "12345" not in message


def test_source_table_error_masks_password() -> None:
    data = with_changes(source={"name": "mx1", "host": "h", "user": "u", "password": SECRET})
    with pytest.raises(ConfigError) as info:
        parse_fetch_config("/etc/site.toml", data)
    assert "'password': '<hidden>'" in str(info.value)
    assert "[[source]]" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"local_domain": ["example.org"], "local_domains": None},
         "unknown setting local_domain (did you mean local_domains?)"),
        ({"source": [{"name": "mx1", "host": "h", "user": "u", "passwd": "p"}]},
         "unknown setting source[0].passwd"),
        ({"daemon": {"intervall": 60}}, "unknown setting daemon.intervall"),
        ({"limits": {"timeouts": {"conect": 5}}}, "unknown setting limits.timeouts.conect"),
        ({"stat": "x", "quarantin": "y"}, "unknown settings quarantin"),
    ],
)
def test_unknown_keys_named(changes: dict[str, object], expected: str) -> None:
    data = {key: value for key, value in with_changes(**changes).items() if value is not None}
    with pytest.raises(ConfigError) as info:
        parse_fetch_config("/etc/site.toml", data)
    assert expected in str(info.value)


def test_inline_password_needs_private_file(tmp_path: Path) -> None:
    site = write_site(tmp_path, SOURCE + 'password = "p"\n', mode=0o644)
    with pytest.raises(ConfigError) as info:
        load_fetch_config(site)
    assert "source[0].password" in str(info.value)
    assert f"chmod 600 {site}" in str(info.value)
    assert "mode 644" in str(info.value)
    site.chmod(0o600)
    assert load_fetch_config(site).sources[0].password == "p"


def test_password_file_in_shared_config(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    site = write_site(tmp_path, SOURCE + 'password_file = "pass"\n', mode=0o644)
    assert load_fetch_config(site).sources[0].password == "s3cret"


def test_missing_ca_file_named(tmp_path: Path) -> None:
    site = write_site(tmp_path, SOURCE + 'password = "p"\nca_file = "/nonexistent/ca.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_fetch_config(site)
    assert str(info.value) == (
        f"{site}: source[0].ca_file = '/nonexistent/ca.pem': file not found")


def test_missing_password_file_named(tmp_path: Path) -> None:
    site = write_site(tmp_path, SOURCE + 'password_file = "/nonexistent/pw"\n')
    with pytest.raises(ConfigError) as info:
        load_fetch_config(site)
    assert "source[0].password_file = '/nonexistent/pw'" in str(info.value)
    assert "No such file" in str(info.value)


@pytest.mark.parametrize("key", ["state", "quarantine"])
def test_folder_of_state_and_quarantine_must_exist(tmp_path: Path, key: str) -> None:
    site = write_site(tmp_path, SOURCE + 'password = "p"\n')
    site.write_text(site.read_text().replace(f'{key} = "{tmp_path}/',
                                             f'{key} = "/nonexistent/dir/'))
    with pytest.raises(ConfigError) as info:
        load_fetch_config(site)
    assert f"{key} = '/nonexistent/dir/" in str(info.value)
    assert "the folder /nonexistent/dir does not exist" in str(info.value)


def test_quarantine_folder_may_exist(tmp_path: Path) -> None:
    (tmp_path / "q").mkdir()
    site = write_site(tmp_path, SOURCE + 'password = "p"\n')
    assert load_fetch_config(site).quarantine == tmp_path / "q"


def test_delivery_error_names_file_and_key() -> None:
    from mailfeed.fetchcmd import make_target

    config = parse_fetch_config("/etc/site.toml", with_changes(delivery="smtp:/nowhere"))
    with pytest.raises(ConfigError) as info:
        make_target(config)
    assert str(info.value).startswith("/etc/site.toml: delivery = 'smtp:/nowhere': ")
