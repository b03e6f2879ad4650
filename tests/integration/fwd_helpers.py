"""Helpers for running mailfeed-fwd against a temporary spool."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.support import ROOT, as_run_user, script

MAILDIR_SITE = "site1"
MBOX_SITE = "mb"


def write_config(root: Path, limits: str = "") -> Path:
    """Write an mx.toml with a Maildir site and an mbox site under ``root``."""
    config = root / "mx.toml"
    config.write_text(
        f'spool_root = "{root}"\n'
        f"[limits]\n{limits}\n"
        f"[sites.{MAILDIR_SITE}]\n"
        f'[sites.{MBOX_SITE}]\nformat = "mbox"\n'
    )
    return config


def fwd_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFEED_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    env.update(extra)
    return env


def run_fwd(
    args: Sequence[str],
    stdin: bytes = b"",
    *,
    as_user: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    argv = [script("mailfeed-fwd"), *args]
    if as_user:
        argv = as_run_user(argv)
    return subprocess.run(
        argv, input=stdin, capture_output=True, env=env or fwd_env(), timeout=120, check=False
    )


def maildir_files(root: Path, sub: str = "new") -> list[Path]:
    folder = root / MAILDIR_SITE / sub
    return sorted(folder.iterdir()) if folder.exists() else []
