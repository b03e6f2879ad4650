"""mailfeed-fwd's start-up cost: what one delivery imports.

An MTA starts one mailfeed-fwd per message, so every module on its path is
imported once per message.  These tests store a real message and then list
the modules that are known to be slow to import and that fwd does not need.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fwd_helpers import MAILDIR_SITE, fwd_env, maildir_files, write_config
from tests.support import as_run_user, script, shared_tmpdir

# dataclasses pulls in inspect, ast, dis and tokenize.  One message needs no
# threads, and the other modules belong to the daemons.
AVOIDED = ("dataclasses", "inspect", "ast", "threading", "email", "asyncio", "argparse",
           "subprocess", "logging")
# Run one delivery in-process, then print the avoided modules that were loaded.
PROBE = (
    "import sys\n"
    "from mailfeed import fwd\n"
    "code = fwd.main(sys.argv[1:])\n"
    "print(code, ' '.join(m for m in {avoided!r} if m in sys.modules))\n"
)


@pytest.fixture
def root() -> Iterator[Path]:
    path = shared_tmpdir()
    write_config(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_probe(root: Path, site: str) -> list[str]:
    code = PROBE.format(avoided=AVOIDED)
    argv = as_run_user([script("python"), "-c", code, "--config", str(root / "mx.toml"),
                        site, "a@example.net", "b@example.org"])
    result = subprocess.run(argv, input=b"Subject: t\r\n\r\nBody.\r\n", env=fwd_env(),
                            capture_output=True, timeout=120, check=True)
    status, *loaded = result.stdout.decode().split()
    assert status == "0", result.stderr
    return loaded


def test_maildir_delivery_imports(root: Path) -> None:
    assert run_probe(root, MAILDIR_SITE) == []
    assert len(maildir_files(root)) == 1
