"""docs/configuration.md lists every configuration key the code reads.

Each key table on that page follows a marker line
``<!-- config-keys: FILE SECTION -->`` (FILE is ``mx`` or ``fetch``, SECTION
is ``top`` or the TOML table header, such as ``[limits]``).  The tests run
the real parsers on a small valid file while recording every key that a
:class:`mailfeed.config.Section` getter is asked for, with the table it is
read from and the default passed to the getter.  They then check three
things: every key the code reads has a row, every row names a key the code
reads, and the default column shows the code's default.  A grep of the
configuration modules for getter calls also catches a key read only on a
path the small file does not take.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailfeed import config as config_module
from mailfeed.config import Section
from mailfeed.fetchconfig import parse_fetch_config
from mailfeed.mxconfig import mx_config_from
from tests.support import ROOT

REFERENCE = ROOT / "docs" / "configuration.md"
SOURCES = ROOT / "src" / "mailfeed"
# The configuration modules of each file, for the grep of getter calls.
MODULES = {
    "mx": ("config.py", "mxconfig.py"),
    "fetch": ("fetchconfig.py",),
}
GETTERS = ("get_str", "get_int", "get_float", "get_bool", "get_str_list", "get_path",
           "required_str")
GETTER_CALL = re.compile(
    r"\.(?:" + "|".join(GETTERS) + r")\(\s*\"(?P<key>[a-z_]+)\""
    r"|parse_listen\(\s*\w+,\s*\"(?P<listen>[a-z_]+)\""
)
MARKER = re.compile(r"^<!-- config-keys: (?P<file>\S+) (?P<section>.+?) -->$")
BACKTICKED = re.compile(r"`([^`]+)`")
SITE_NAME = "site1"

MX_FILE = {
    "spool_root": "/var/spool/mailfeed",
    "limits": {},
    "sites": {SITE_NAME: {"format": "maildir", "domains": ["example.org"]}},
    "mx": {"hostname": "mx.example.net"},
}
FETCH_FILE = {
    "state": "/var/lib/mailfeed/fetch.sqlite",
    "quarantine": "/var/lib/mailfeed/quarantine",
    "local_domains": ["example.org"],
    "delivery": "smtp://127.0.0.1:10026",
    "dsn_reporting_mta": "site.example.org",
    "limits": {"timeouts": {}},
    "daemon": {},
    "source": [{"name": "mx1", "host": "mx.example.net", "user": SITE_NAME,
                "password": "secret"}],
}

Key = tuple[str, str]  # (TOML table header or "top", key name)


def section_of(prefix: str) -> str:
    """Return the table header for a Section prefix: "" -> top, "sites.x." -> [sites.NAME]."""
    if not prefix:
        return "top"
    path = prefix.rstrip(".")
    if path.startswith("source["):
        return "[[source]]"
    if path.startswith("sites."):
        return "[sites.NAME]"
    return f"[{path}]"


def record_reads(parse: Callable[[], object], monkeypatch: pytest.MonkeyPatch,
                 ) -> dict[Key, Any]:
    """Run ``parse`` and return each key a getter read, with the default it passed."""
    reads: dict[Key, Any] = {}

    def wrap(name: str) -> None:
        original = getattr(Section, name)

        def recording(self: Section, key: str, *args: Any, **kwargs: Any) -> Any:
            default = args[0] if args else kwargs.get("default")
            # get_path and required_str call get_str: keep the outer call's default.
            reads.setdefault((section_of(self.prefix), key), default)
            return original(self, key, *args, **kwargs)

        monkeypatch.setattr(Section, name, recording)

    for getter in GETTERS:
        wrap(getter)
    parse()
    return reads


def mx_reads(monkeypatch: pytest.MonkeyPatch) -> dict[Key, Any]:
    return record_reads(lambda: mx_config_from("/etc/mailfeed/mx.toml", MX_FILE), monkeypatch)


def fetch_reads(monkeypatch: pytest.MonkeyPatch) -> dict[Key, Any]:
    return record_reads(
        lambda: parse_fetch_config("/etc/mailfeed/fetch.toml", FETCH_FILE), monkeypatch)


def table_rows(lines: list[str], start: int) -> Iterator[dict[str, str]]:
    """Yield the rows of the Markdown table that starts after line ``start``."""
    index = start + 1
    while index < len(lines) and not lines[index].startswith("|"):
        index += 1
    header = [cell.strip() for cell in lines[index].strip().strip("|").split("|")]
    index += 2  # the header and the |---| line
    while index < len(lines) and lines[index].startswith("|"):
        cells = [cell.strip() for cell in lines[index].strip().strip("|").split("|")]
        yield dict(zip(header, cells, strict=True))
        index += 1


def documented_keys(file: str) -> dict[Key, str]:
    """Return the documented keys of one file with their default cells."""
    lines = REFERENCE.read_text(encoding="utf-8").splitlines()
    keys: dict[Key, str] = {}
    for number, line in enumerate(lines):
        match = MARKER.match(line)
        if match is None or match["file"] != file:
            continue
        for row in table_rows(lines, number):
            name = row["key"].strip("`")
            key = (match["section"], name)
            assert key not in keys, f"{REFERENCE.name}: {key} has two rows"
            keys[key] = row["default"]
    return keys


def grepped_keys(file: str) -> set[str]:
    names: set[str] = set()
    for module in MODULES[file]:
        text = (SOURCES / module).read_text(encoding="utf-8")
        for match in GETTER_CALL.finditer(text):
            names.add(match["key"] or match["listen"])
    return names


def shows_default(cell: str, default: Any) -> bool:
    """Return whether a backticked TOML value in ``cell`` equals ``default``."""
    expected = list(default) if isinstance(default, tuple) else default
    for token in BACKTICKED.findall(cell):
        try:
            value = tomllib.loads(f"v = {token}")["v"]
        except tomllib.TOMLDecodeError:
            continue
        if isinstance(value, bool) != isinstance(expected, bool):
            continue
        if value == expected:
            return True
    return False


def checked_defaults(reads: dict[Key, Any]) -> dict[Key, Any]:
    """Return the defaults that the page must show: numbers, booleans, strings, lists.

    None means "no default" (a required key, or one computed at run time such
    as the host name), and the site's ``path`` defaults to the site's name.
    """
    return {
        key: default for key, default in reads.items()
        if default is not None and default != SITE_NAME and default not in ([], ())
    }


@pytest.mark.parametrize("file", ["mx", "fetch"])
def test_every_read_key_documented(file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = mx_reads(monkeypatch) if file == "mx" else fetch_reads(monkeypatch)
    documented = documented_keys(file)
    assert documented, f"{REFERENCE.name}: no key tables for the {file} file"
    missing = sorted(set(reads) - set(documented))
    assert missing == [], f"{REFERENCE.name}: keys read by the code but not documented"


@pytest.mark.parametrize("file", ["mx", "fetch"])
def test_every_documented_key_read(file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = mx_reads(monkeypatch) if file == "mx" else fetch_reads(monkeypatch)
    stale = sorted(set(documented_keys(file)) - set(reads))
    assert stale == [], f"{REFERENCE.name}: documented keys that the code does not read"


@pytest.mark.parametrize("file", ["mx", "fetch"])
def test_grepped_keys_documented(file: str) -> None:
    names = grepped_keys(file)
    assert names, f"no getter calls found in {MODULES[file]}: update GETTER_CALL"
    documented = {name for _section, name in documented_keys(file)}
    assert sorted(names - documented) == []


@pytest.mark.parametrize("file", ["mx", "fetch"])
def test_documented_defaults_match(file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = mx_reads(monkeypatch) if file == "mx" else fetch_reads(monkeypatch)
    documented = documented_keys(file)
    defaults = checked_defaults(reads)
    assert defaults, "no defaults recorded"
    wrong = {
        key: (default, documented[key]) for key, default in defaults.items()
        if key in documented and not shows_default(documented[key], default)
    }
    assert wrong == {}, f"{REFERENCE.name}: default cells that differ from the code"


def test_default_paths_documented() -> None:
    from mailfeed.fetchcmd import CONFIG_ENV as FETCH_ENV
    from mailfeed.fetchcmd import DEFAULT_FETCH_CONFIG

    text = REFERENCE.read_text(encoding="utf-8")
    for value in (config_module.DEFAULT_MX_CONFIG, config_module.CONFIG_ENV,
                  DEFAULT_FETCH_CONFIG, FETCH_ENV):
        assert f"`{value}`" in text or f"`${value}`" in text, value


def test_table_parser_reads_rows() -> None:
    lines = ["<!-- config-keys: mx top -->", "| key | type | default | unit | description |",
             "| --- | --- | --- | --- | --- |", "| `a` | integer | `5` | s | An x. |", ""]
    assert list(table_rows(lines, 0)) == [
        {"key": "`a`", "type": "integer", "default": "`5`", "unit": "s",
         "description": "An x."}]


def test_shows_default_compares_values() -> None:
    assert shows_default("`300`", 300.0)
    assert shows_default('`["127.0.0.1:25"]`', ("127.0.0.1:25",))
    assert shows_default("`false`", False)
    assert not shows_default("`0`", False)
    assert not shows_default("`30`", 300.0)
    assert not shows_default("none", 300.0)


def test_site_example_parses() -> None:
    name = "mailfeed/site-dovecot.toml"
    data = tomllib.loads((ROOT / "docs" / "examples" / name).read_text(encoding="utf-8"))
    for source in data["source"]:
        # The example's password file does not exist here.
        source["password"] = "secret"
        del source["password_file"]
    config = parse_fetch_config(f"/etc/mailfeed/{name}", data)
    assert [source.port for source in config.sources] == [995]
    assert config.delivery == "smtp://127.0.0.1:10026"
