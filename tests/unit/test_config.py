"""Configuration checks of the MX side: values that would misroute or crash."""

from __future__ import annotations

import tomllib

import pytest

from mailfeed.config import MAX_SECONDS, mx_spool_config_from
from mailfeed.errors import ConfigError


def load(text: str) -> None:
    mx_spool_config_from("mx.toml", tomllib.loads(text))


def test_valid_config_loads() -> None:
    data = tomllib.loads('spool_root = "/srv/spool"\n[sites.a]\n[sites.b]\npath = "/srv/b"\n')
    config, _top = mx_spool_config_from("mx.toml", data)
    assert str(config.site("a").path) == "/srv/spool/a"
    assert str(config.site("b").path) == "/srv/b"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", str(MAX_SECONDS + 1)])
@pytest.mark.parametrize("name", ["deadline", "lock_timeout"])
def test_limit_seconds_must_be_finite(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"limits.{name} = .*expected a finite number"):
        load(f'spool_root = "/srv"\n[limits]\n{name} = {value}\n')


def test_relative_spool_root_rejected() -> None:
    with pytest.raises(ConfigError, match="spool_root = 'spool': expected an absolute path"):
        load('spool_root = "spool"\n[sites.a]\n')


@pytest.mark.parametrize("path", ["", ".", "/"])
def test_site_path_must_name_a_mailbox(path: str) -> None:
    with pytest.raises(ConfigError, match=r"sites\.a\.path = .*below spool_root"):
        load(f'spool_root = "/srv"\n[sites.a]\npath = "{path}"\n')


@pytest.mark.parametrize("second", ['path = "a"', 'path = "/srv/a"', 'path = "./a"'])
def test_two_sites_one_mailbox_rejected(second: str) -> None:
    with pytest.raises(ConfigError, match="also the mailbox of site 'a'"):
        load(f'spool_root = "/srv"\n[sites.a]\n[sites.b]\n{second}\n')


@pytest.mark.parametrize("key", ["spool_rot", "limit", "site", "MX"])
def test_unknown_top_level_key_rejected(key: str) -> None:
    with pytest.raises(ConfigError, match=f"mx.toml: unknown setting {key}: the top level"):
        load(f'spool_root = "/srv"\n{key} = "/srv/x"\n')


def test_known_top_level_keys_accepted() -> None:
    load('spool_root = "/srv"\n[limits]\n[sites.a]\n[mx]\nhostname = "mx.example.org"\n')
