"""The configuration examples under docs/examples/, as the peer tests use them.

The deployment guide embeds these files, and the tests run the peers with
them.  Only deployment-specific values change: paths, account names and
ports, through an explicit substitution table.  Each old value must occur in
the file, so an edit of the example that drops one fails the test instead of
silently testing something else.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support import ROOT

EXAMPLES_DIR = ROOT / "docs" / "examples"
GUIDE = ROOT / "docs" / "deploy-postfix-dovecot.md"


def example_path(name: str) -> Path:
    return EXAMPLES_DIR / name


def example_text(name: str, substitutions: Mapping[str, str] | None = None) -> str:
    """Return the example file ``name`` with each old value replaced by its new one."""
    text = example_path(name).read_text()
    for old, new in (substitutions or {}).items():
        if old not in text:
            raise AssertionError(
                f"{EXAMPLES_DIR / name} no longer contains {old!r}: "
                "update the substitutions in the peer tests"
            )
        text = text.replace(old, new)
    return text


def example_toml(name: str, substitutions: Mapping[str, str] | None = None) -> dict[str, Any]:
    return tomllib.loads(example_text(name, substitutions))


def transport_entries(name: str = "postfix-mx/mailfeed-transport") -> list[tuple[str, str, str]]:
    """Return (domain, transport, site) for each line of the example transport table."""
    entries = []
    for line in example_text(name).splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        domain, action = line.split()
        transport, _, site = action.partition(":")
        entries.append((domain, transport, site))
    return entries
