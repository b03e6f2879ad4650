"""``mailfeed site add`` and ``mailfeed site list``: manage the MX host's sites.

``site add NAME`` checks everything before it writes anything.  The name must
be one safe path component and no site of that name may exist.  No other site
may claim its domains or addresses, which is checked by parsing the whole
configuration with the new table added.  The passwd-file must have no user of
that name.  Then it

1. creates the spool (a Maildir with mode 0700, or the folder of an mbox).
   With ``--owner USER[:GROUP]`` it gives the folders it created and the
   site's spool to that user, the one the MTA runs ``mailfeed-fwd`` as.  An
   unknown user or group exits 64 before anything is written;
2. appends ``NAME:{ARGON2ID}...`` to the passwd-file, created with mode 0600;
3. appends a ``[sites."NAME"]`` table to the configuration file, leaving the
   existing text untouched.

An unsupported ``--scheme`` exits 64 (EX_USAGE) naming the supported ones.
Each append is flushed and fsynced.  The password is read from a file or from
standard input, never from the command line, and is never printed or logged.
Send SIGHUP to a running ``mailfeed mx`` to make it serve the new site.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

from mailfeed.config import CONFIG_ENV, DEFAULT_MX_CONFIG, SiteConfig, validate_site_name
from mailfeed.errors import ConfigError, NotPermitted, UnknownSite, UsageError

__all__ = ["add_arguments", "add_site", "check_scheme", "parse_owner", "run", "site_table"]

PASSWD_MODE = 0o600
SPOOL_DIR_MODE = 0o700
FORMATS = ("maildir", "mbox")
DEFAULT_SCHEME = "ARGON2ID"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        help=f"MX configuration file (default: ${CONFIG_ENV} or {DEFAULT_MX_CONFIG})",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add", parents=[common], help="create a site: spool, configuration, credential"
    )
    add.add_argument("name", metavar="NAME", help="site name, also its POP3 user name")
    add.add_argument(
        "--domain", action="append", default=[], help="a domain whose mail goes to the site"
    )
    add.add_argument(
        "--address", action="append", default=[], help="one address whose mail goes to the site"
    )
    add.add_argument("--format", choices=FORMATS, default="maildir", help="spool format")
    secret = add.add_mutually_exclusive_group(required=True)
    secret.add_argument("--password-file", help="read the POP3 password from the file's first line")
    secret.add_argument(
        "--password-stdin", action="store_true", help="read the POP3 password from standard input"
    )
    add.add_argument(
        "--passwd-file", help="passwd-file to append to (default: [mx] passwd_file of the config)"
    )
    add.add_argument(
        "--scheme", default=DEFAULT_SCHEME, help=f"password hash scheme (default {DEFAULT_SCHEME})"
    )

    add.add_argument(
        "--owner",
        metavar="USER[:GROUP]",
        help="give the spool folders to this user (and group, default the user's own), "
        "the user the MTA runs mailfeed-fwd as",
    )

    actions.add_parser("list", parents=[common], help="list the configured sites")


def run(args: argparse.Namespace) -> int:
    from mailfeed.config import config_path

    path = Path(config_path(args.config))
    if args.action == "list":
        return list_sites(path)
    check_scheme(args.scheme)
    owner = parse_owner(args.owner) if args.owner else None
    password = read_password(args.password_file, args.password_stdin)
    passwd_file = Path(args.passwd_file) if args.passwd_file else None
    site = add_site(
        path,
        args.name,
        domains=args.domain,
        addresses=args.address,
        spool_format=args.format,
        password=password,
        passwd_file=passwd_file,
        scheme=args.scheme,
        owner=owner,
    )
    print(f"site {site.name} added: spool {site.path}; send SIGHUP to mailfeed mx to serve it")
    return 0


def check_scheme(scheme: str) -> None:
    """Raise UsageError unless ``site add`` can hash passwords with ``scheme``."""
    from mailfeed.passwd import HASH_SCHEMES

    if scheme.upper() not in HASH_SCHEMES:
        raise UsageError(
            f"--scheme {scheme!r} is not supported; use one of {', '.join(HASH_SCHEMES)}"
        )


def read_password(password_file: str | None, from_stdin: bool) -> str:
    """Read the password: the first line of a file or of standard input."""
    if from_stdin:
        line = sys.stdin.readline()
        where = "standard input"
    else:
        assert password_file is not None
        try:
            with open(password_file, encoding="utf-8") as fp:
                line = fp.readline()
        except OSError as exc:
            raise UsageError(f"cannot read the password file {password_file}: {exc}") from None
        where = password_file
    password = line.rstrip("\r\n")
    if not password:
        raise UsageError(f"empty password read from {where}")
    return password


def site_table(
    name: str, spool_format: str, domains: list[str], addresses: list[str]
) -> str:
    """Return the TOML text of one ``[sites.NAME]`` table."""
    # A JSON string with ensure_ascii=False is a valid TOML basic string.
    lines = [
        f"[sites.{json.dumps(name)}]",
        f"format = {json.dumps(spool_format)}",
        f"domains = {json.dumps(domains, ensure_ascii=False)}",
    ]
    if addresses:
        lines.append(f"addresses = {json.dumps(addresses, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def _read_config_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from None


def add_site(
    config: Path,
    name: str,
    *,
    domains: list[str],
    addresses: list[str],
    spool_format: str,
    password: str,
    passwd_file: Path | None = None,
    scheme: str = DEFAULT_SCHEME,
    owner: tuple[int, int] | None = None,
) -> SiteConfig:
    """Create a site's spool, credential and configuration table; return the site.

    With ``owner`` (uid, gid) the folders this call creates and the site's
    spool are given to that user and group.
    """
    from mailfeed.mxconfig import mx_config_from
    from mailfeed.passwd import PasswdFile, hash_password

    try:
        validate_site_name(name)
    except UnknownSite as exc:
        raise UsageError(str(exc)) from None
    check_scheme(scheme)
    if not domains and not addresses:
        raise UsageError("give at least one --domain or --address for the site")

    old_text = _read_config_text(config)
    old_data = tomllib.loads(old_text) if old_text else {}
    if name in old_data.get("sites", {}):
        raise UsageError(f"{config}: site {name!r} already exists; choose another name")

    separator = "" if not old_text or old_text.endswith("\n") else "\n"
    addition = separator + ("\n" if old_text else "") + site_table(
        name, spool_format, domains, addresses
    )
    new_text = old_text + addition
    try:
        new_data = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config}: the configuration would not be valid TOML: {exc}") from None
    new_config = mx_config_from(str(config), new_data)
    site = new_config.spool.sites[name]
    target = passwd_file or new_config.passwd_file

    if target.exists():
        users = PasswdFile.load(target)
        if name in users:
            raise UsageError(f"{target}: user {name!r} already exists; remove it first")
    hashed = hash_password(password, scheme)

    created = _create_spool(site)
    if owner is not None:
        _chown_spool(site, created, owner)
    _append(target, f"{name}:{hashed}\n", mode=PASSWD_MODE)
    os.chmod(target, PASSWD_MODE)
    _append(config, addition, mode=0o644)
    return site


def parse_owner(text: str) -> tuple[int, int]:
    """Return (uid, gid) for ``USER[:GROUP]``; names or numbers; raise UsageError."""
    import grp
    import pwd

    user, _, group = text.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--owner {text!r}: no user {user!r} on this host") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UsageError(f"--owner {text!r}: no group {group!r} on this host") from None
    return entry.pw_uid, gid


def _missing_folders(folder: Path) -> list[Path]:
    """Return ``folder`` and its ancestors that do not exist, outermost first."""
    missing: list[Path] = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _create_spool(site: SiteConfig) -> list[Path]:
    """Create the site's spool; return the folders created, outermost first."""
    if site.format == "maildir":
        from mailfeed.spool.maildir import open_maildir

        created = _missing_folders(site.path)
        site.path.parent.mkdir(parents=True, exist_ok=True)
        open_maildir(site.path)
        os.chmod(site.path, SPOOL_DIR_MODE)
    else:
        created = _missing_folders(site.path.parent)
        site.path.parent.mkdir(mode=SPOOL_DIR_MODE, parents=True, exist_ok=True)
    return created


def _chown_spool(site: SiteConfig, created: list[Path], owner: tuple[int, int]) -> None:
    """Give the created folders and the site's spool tree to ``owner``."""
    uid, gid = owner
    paths = list(created)
    if site.format == "maildir":
        for folder, subfolders, files in os.walk(site.path):
            paths.append(Path(folder))
            paths.extend(Path(folder, name) for name in subfolders + files)
    elif site.format == "mbox":
        paths.append(site.path.parent)
        if site.path.exists():
            paths.append(site.path)
    for path in dict.fromkeys(paths):
        try:
            os.lchown(path, uid, gid)
        except OSError as exc:
            raise NotPermitted(
                f"cannot give {path} to uid {uid} gid {gid}: {exc.strerror}; run site add "
                "as root or leave out --owner"
            ) from None


def _append(path: Path, text: str, *, mode: int) -> None:
    """Append text to a file (created with ``mode``), flush and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        data = text.encode("utf-8")
        while data:
            written = os.write(fd, data)
            data = data[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def list_sites(config: Path) -> int:
    from mailfeed.config import load_mx_spool_config

    spool = load_mx_spool_config(str(config))
    for site in spool.sites.values():
        targets = " ".join([*site.domains, *site.addresses]) or "-"
        print(f"{site.name}\t{site.format}\t{site.path}\t{targets}")
    return 0
