"""TOML configuration: loading, typed lookups and the MX side's sites.

Every error names the file, the key and the offending value, so an admin can
fix the file without reading code.  Sections owned by one program (the MX
daemon's listeners, the fetcher's sources) are parsed by that program's own
configuration module with the helpers here.

The site table maps a site name to its spool::

    spool_root = "/var/spool/mailfeed"

    [sites.site1]
    format = "maildir"          # maildir (default), mbox or pipe
    path = "site1"              # relative to spool_root; default: the site name
    domains = ["example.org"]   # used by the MX daemon's SMTP receiver
    command = ["/usr/lib/dovecot/dovecot-lda", "-d", "site1"]   # pipe only
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from mailfeed.errors import ConfigError, UnknownSite

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "DEFAULT_MX_CONFIG",
    "MX_CONFIG_KEYS",
    "Limits",
    "MxSpoolConfig",
    "Section",
    "SiteConfig",
    "is_secret_key",
    "load_mx_spool_config",
    "load_toml",
    "mask_secrets",
    "validate_site_name",
]

DEFAULT_MX_CONFIG = "/etc/mailfeed/mx.toml"
CONFIG_ENV = "MAILFEED_CONFIG"

SPOOL_FORMATS = ("maildir", "mbox", "pipe")
# A site name becomes one path component under the spool root.
SITE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
MAX_SITE_NAME = 64
# Upper bound of the limits in seconds: one week.  It keeps huge values out
# of timers such as setitimer, which reject them.
MAX_SECONDS = 7 * 24 * 3600.0

# The top-level keys and tables of the MX configuration file, which
# mailfeed-fwd and ``mailfeed mx`` share: the spool (spool_root, limits,
# sites) and the daemon's own [mx] table (read by mxconfig).  Each program
# rejects any other key, so a misspelt ``spool_rot`` is an error in both
# instead of a silent fall-back to the default spool root.
MX_CONFIG_KEYS = ("spool_root", "limits", "sites", "mx")

T = TypeVar("T")

# Shown in place of a secret's value in every configuration error.
SECRET_MASK = "<hidden>"


def is_secret_key(name: str) -> bool:
    """Return True for a key whose value is a secret: ``password``, ``*password``, ``*_secret``."""
    lowered = name.lower()
    return lowered.endswith("password") or lowered.endswith("_secret")


def mask_secrets(value: Any) -> Any:
    """Return ``value`` with the value of every secret key replaced, at any depth.

    Any error or log line that shows a table or a value of a configuration
    file goes through this function, so a misplaced table cannot show a
    password.
    """
    if isinstance(value, Mapping):
        return {key: SECRET_MASK if isinstance(key, str) and is_secret_key(key)
                else mask_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    return value


def validate_site_name(name: str) -> str:
    """Return ``name`` if it is safe as one path component, else raise UnknownSite.

    Rejects ``..``, ``/``, NUL, a leading dot, and names over 64 characters,
    before any path is built from the name.
    """
    if len(name) > MAX_SITE_NAME:
        raise UnknownSite(f"invalid site name {name[:70]!r}: over {MAX_SITE_NAME} characters")
    if not SITE_NAME_RE.fullmatch(name) or ".." in name:
        raise UnknownSite(
            f"invalid site name {name!r}: use letters, digits, '.', '_', '+' and '-', "
            "not starting with '.' and without '..'"
        )
    return name


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file; raise ConfigError naming the file on any failure."""
    try:
        with open(path, "rb") as fp:
            return tomllib.load(fp)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the configuration") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None


class Section:
    """Typed, checked access to one table of a configuration file.

    Each getter raises ConfigError naming the file, the dotted key and the
    value.  :meth:`check_unknown` rejects keys that no getter asked for, so a
    misspelt option is an error instead of being silently ignored.
    """

    def __init__(self, path: str, data: Mapping[str, Any], prefix: str = "") -> None:
        self.path = path
        self.data = data
        self.prefix = prefix
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, message: str) -> ConfigError:
        if name not in self.data:
            shown = ""
        elif is_secret_key(name):
            shown = f" = {SECRET_MASK}"
        else:
            shown = f" = {mask_secrets(self.data[name])!r}"
        return ConfigError(f"{self.path}: {self.key(name)}{shown}: {message}")

    def _get(self, name: str, kind: type[T] | tuple[type, ...], kind_name: str) -> Any:
        self.seen.add(name)
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) and kind is not bool:
            raise self.error(name, f"expected {kind_name}")
        if not isinstance(value, kind):
            raise self.error(name, f"expected {kind_name}")
        return value

    def has(self, name: str) -> bool:
        return name in self.data

    def get_str(
        self, name: str, default: str | None = None, *, choices: tuple[str, ...] = ()
    ) -> Any:
        value = self._get(name, str, "a string")
        if value is None:
            return default
        if choices and value not in choices:
            raise self.error(name, f"expected one of {', '.join(choices)}")
        return value

    def required_str(self, name: str, *, choices: tuple[str, ...] = ()) -> str:
        value = self.get_str(name, choices=choices)
        if value is None:
            raise ConfigError(f"{self.path}: {self.key(name)}: missing required setting")
        return str(value)

    def get_int(
        self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self._get(name, int, "an integer")
        if value is None:
            return default
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and {maximum}" if maximum is not None else ""
            raise self.error(name, f"expected an integer between {minimum}{upper}")
        return int(value)

    def get_float(
        self, name: str, default: float, *, minimum: float = 0.0, maximum: float | None = None
    ) -> float:
        """Return a finite number; TOML's nan and inf are rejected."""
        value = self._get(name, (int, float), "a number")
        if value is None:
            return default
        upper = math.inf if maximum is None else maximum
        # "not (a <= v < inf)" also rejects nan.
        if not minimum <= value < math.inf or value > upper:
            bound = f"between {minimum:g} and {upper:g}" if maximum is not None else (
                f"of at least {minimum:g}"
            )
            raise self.error(name, f"expected a finite number {bound}")
        return float(value)

    def get_bool(self, name: str, default: bool) -> bool:
        value = self._get(name, bool, "true or false")
        return default if value is None else bool(value)

    def get_str_list(self, name: str, default: list[str] | None = None) -> list[str]:
        value = self._get(name, list, "a list of strings")
        if value is None:
            return list(default or [])
        if not all(isinstance(item, str) for item in value):
            raise self.error(name, "expected a list of strings")
        return list(value)

    def get_path(
        self, name: str, default: str | None = None, *, base: Path | None = None
    ) -> Path | None:
        value = self.get_str(name, default)
        if value is None:
            return None
        result = Path(value)
        if base is not None and not result.is_absolute():
            result = base / result
        return result

    def table(self, name: str) -> Section:
        value = self._get(name, dict, "a table")
        return Section(self.path, value or {}, f"{self.key(name)}.")

    def tables(self, name: str) -> dict[str, Section]:
        value = self._get(name, dict, "a table of tables")
        result: dict[str, Section] = {}
        for sub, data in (value or {}).items():
            if not isinstance(data, dict):
                raise ConfigError(f"{self.path}: {self.key(name)}.{sub}: expected a table")
            result[sub] = Section(self.path, data, f"{self.key(name)}.{sub}.")
        return result

    def check_unknown(self, known: Iterable[str] = ()) -> None:
        """Raise ConfigError naming every key neither read nor listed in ``known``.

        Parsers that check values against each other call this first with
        the full list of keys, so that a misspelt key is reported as such
        instead of as the missing key it was meant to be.
        """
        allowed = self.seen | set(known)
        unknown = sorted(str(key) for key in set(self.data) - allowed)
        if not unknown:
            return
        hints = []
        for key in unknown:
            import difflib  # only on this error path: mailfeed-fwd starts once per message

            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hints.append(self.key(key) + (f" (did you mean {close[0]}?)" if close else ""))
        noun = "setting" if len(unknown) == 1 else "settings"
        raise ConfigError(f"{self.path}: unknown {noun} {', '.join(hints)}")


class _Value:
    """An immutable value, compared, hashed and shown by its ``_fields``.

    The settings classes below are plain classes, not frozen dataclasses:
    ``dataclasses`` imports ``inspect``, and mailfeed-fwd, one process per
    message, would pay for that on every message.
    """

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, _Value)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of {type(self).__name__}")

    def __reduce__(self) -> tuple[type[Self], tuple[Any, ...]]:
        return (type(self), self._values())

    def replace(self, **changes: Any) -> Self:
        """Return a copy with the given fields changed."""
        values = dict(zip(self._fields, self._values(), strict=True))
        values.update(changes)
        return type(self)(**values)


class Limits(_Value):
    """Limits that apply to every message the MX side stores.

    The class attributes are the defaults.
    """

    _fields = ("max_message_size", "max_recipients", "deadline", "lock_timeout")

    # Octets of message data accepted (0: no limit).
    max_message_size: int = 100 * 1024 * 1024
    max_recipients: int = 1000
    # Seconds mailfeed-fwd may take before it gives up with EX_TEMPFAIL.
    deadline: float = 300.0
    # Seconds to wait for an mbox lock.
    lock_timeout: float = 30.0

    def __init__(
        self,
        max_message_size: int = max_message_size,
        max_recipients: int = max_recipients,
        deadline: float = deadline,
        lock_timeout: float = lock_timeout,
    ) -> None:
        self._set(max_message_size=max_message_size, max_recipients=max_recipients,
                  deadline=deadline, lock_timeout=lock_timeout)


class SiteConfig(_Value):
    """One site: where and how its mailbox is stored."""

    __slots__ = ("addresses", "command", "domains", "format", "name", "path")
    _fields = ("name", "format", "path", "domains", "addresses", "command")

    name: str
    format: str
    path: Path
    domains: tuple[str, ...]
    addresses: tuple[str, ...]
    command: tuple[str, ...]

    def __init__(
        self,
        name: str,
        format: str,
        path: Path,
        domains: tuple[str, ...] = (),
        addresses: tuple[str, ...] = (),
        command: tuple[str, ...] = (),
    ) -> None:
        self._set(name=name, format=format, path=path, domains=domains,
                  addresses=addresses, command=command)


class MxSpoolConfig(_Value):
    """The MX side's spool settings: the sites and the limits."""

    __slots__ = ("limits", "sites", "source", "spool_root")
    _fields = ("source", "spool_root", "sites", "limits")

    source: str
    spool_root: Path
    sites: dict[str, SiteConfig]
    limits: Limits

    def __init__(
        self,
        source: str,
        spool_root: Path,
        sites: dict[str, SiteConfig] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._set(source=source, spool_root=spool_root,
                  sites={} if sites is None else sites,
                  limits=Limits() if limits is None else limits)

    def site(self, name: str) -> SiteConfig:
        validate_site_name(name)
        try:
            return self.sites[name]
        except KeyError:
            raise UnknownSite(f"unknown site {name!r}: not in {self.source}") from None


def parse_limits(section: Section) -> Limits:
    limits = Limits(
        max_message_size=section.get_int("max_message_size", Limits.max_message_size),
        max_recipients=section.get_int("max_recipients", Limits.max_recipients, minimum=1),
        deadline=section.get_float(
            "deadline", Limits.deadline, minimum=1.0, maximum=MAX_SECONDS
        ),
        lock_timeout=section.get_float(
            "lock_timeout", Limits.lock_timeout, minimum=0.1, maximum=MAX_SECONDS
        ),
    )
    section.check_unknown()
    return limits


def parse_site(name: str, section: Section, spool_root: Path) -> SiteConfig:
    try:
        validate_site_name(name)
    except UnknownSite as exc:
        raise ConfigError(f"{section.path}: sites.{name}: {exc}") from None
    fmt = section.get_str("format", "maildir", choices=SPOOL_FORMATS)
    path_text = section.get_str("path", name)
    path = Path(path_text)
    if path_text == "" or path.parts in ((), ("/",)):
        # Path("") is ".", which would make the spool root itself the mailbox.
        raise section.error("path", "expected a folder or file name below spool_root")
    if not path.is_absolute():
        if ".." in path.parts:
            raise section.error("path", "a relative path may not contain '..'")
        path = spool_root / path
    command = tuple(section.get_str_list("command"))
    if fmt == "pipe" and not command:
        raise ConfigError(f"{section.path}: {section.key('command')}: required for format pipe")
    site = SiteConfig(
        name=name,
        format=fmt,
        path=path,
        domains=tuple(d.lower() for d in section.get_str_list("domains")),
        addresses=tuple(a.lower() for a in section.get_str_list("addresses")),
        command=command,
    )
    section.check_unknown()
    return site


def mx_spool_config_from(path: str, data: Mapping[str, Any]) -> tuple[MxSpoolConfig, Section]:
    """Build the spool config from parsed TOML; return the top section too.

    A top-level key outside :data:`MX_CONFIG_KEYS` raises ConfigError.  The
    caller (the MX daemon) may read further tables from the returned section
    before calling ``check_unknown`` on it.
    """
    unknown = sorted(set(data) - set(MX_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown setting {unknown[0]}: the top level may hold only "
            f"{', '.join(MX_CONFIG_KEYS)}"
        )
    top = Section(path, data)
    spool_root = Path(top.get_str("spool_root", "/var/spool/mailfeed"))
    if not spool_root.is_absolute():
        # A relative root would depend on the working folder the MTA gives us.
        raise top.error("spool_root", "expected an absolute path")
    limits = parse_limits(top.table("limits"))
    sites: dict[str, SiteConfig] = {}
    owners: dict[str, str] = {}
    for name, section in top.tables("sites").items():
        site = parse_site(name, section, spool_root)
        # Two sites on one mailbox would fetch each other's mail.
        key = os.path.normpath(site.path)
        if key in owners:
            raise ConfigError(
                f"{path}: sites.{name}.path: {site.path} is also the mailbox of site "
                f"{owners[key]!r}; give each site its own path"
            )
        owners[key] = name
        sites[name] = site
    return MxSpoolConfig(path, spool_root, sites, limits), top


def config_path(explicit: str | None) -> str:
    """Return the configuration path: the option, $MAILFEED_CONFIG, or the default."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_MX_CONFIG


def load_mx_spool_config(path: str) -> MxSpoolConfig:
    """Load the MX side's sites and limits; the [mx] table is left to mxconfig."""
    config, _top = mx_spool_config_from(path, load_toml(path))
    return config
