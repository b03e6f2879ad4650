"""Crash safety: mailfeed-fwd killed or failing at each fault point leaves nothing partial."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfeed.spool.maildir import FAULT_POINTS as MAILDIR_POINTS
from mailfeed.spool.mbox import FAULT_POINTS as MBOX_POINTS
from tests.integration.fwd_helpers import (
    MAILDIR_SITE,
    MBOX_SITE,
    fwd_env,
    maildir_files,
    run_fwd,
    write_config,
)
from tests.support import case_bytes, shared_tmpdir, split_mboxrd


@pytest.fixture
def root() -> Iterator[Path]:
    path = shared_tmpdir()
    write_config(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def store(root: Path, site: str, fault: str | None = None) -> tuple[int, bytes]:
    env = fwd_env(MAILFEED_FAULT=fault) if fault else fwd_env()
    result = run_fwd(
        ["--config", str(root / "mx.toml"), site, "alice@example.net", "bob@example.org"],
        case_bytes("H19.eml"),
        env=env,
    )
    return result.returncode, result.stderr


# Points after which the message is complete in new/ (SIGKILL cannot undo them).
MAILDIR_COMPLETE_AFTER = {"maildir.after_link", "maildir.after_dir_fsync"}


@pytest.mark.parametrize("point", MAILDIR_POINTS)
def test_maildir_kill(root: Path, point: str) -> None:
    code, _err = store(root, MAILDIR_SITE, f"{point}:kill")
    assert code == -signal.SIGKILL
    files = maildir_files(root)
    if point in MAILDIR_COMPLETE_AFTER:
        [stored] = files
        data = stored.read_bytes()
        assert data.startswith(b"X-Mailfeed-Sender: alice@example.net\r\n")
        assert data.endswith(case_bytes("H19.eml"))
        assert stored.name.endswith(f",S={len(data)},W={len(data)}")
    else:
        assert files == []


@pytest.mark.parametrize("action", ["enospc", "eio"])
@pytest.mark.parametrize("point", MAILDIR_POINTS)
def test_maildir_error_exit_75(root: Path, point: str, action: str) -> None:
    code, err = store(root, MAILDIR_SITE, f"{point}:{action}")
    assert code == 75
    assert f"injected at fault point {point}" in err.decode()
    assert maildir_files(root) == []
    assert maildir_files(root, "tmp") == []


def mbox_messages(root: Path) -> list[bytes]:
    return [m for _f, m in split_mboxrd((root / MBOX_SITE).read_bytes())]


@pytest.mark.parametrize("point", MBOX_POINTS)
def test_mbox_kill_then_recovered(root: Path, point: str) -> None:
    assert store(root, MBOX_SITE)[0] == 0
    before = (root / MBOX_SITE).read_bytes()
    code, _err = store(root, MBOX_SITE, f"{point}:kill")
    assert code == -signal.SIGKILL
    after = (root / MBOX_SITE).read_bytes()
    lock = root / f"{MBOX_SITE}.lock"
    assert after.startswith(before)
    if after != before:
        # A partial append is only possible with the old length in the dotlock.
        assert lock.read_text().split()[2] == str(len(before))
    # The next delivery finds the dead owner's lock and truncates first.
    assert store(root, MBOX_SITE)[0] == 0
    assert not lock.exists()
    assert len(mbox_messages(root)) == 2
    assert mbox_messages(root)[0] == mbox_messages(root)[1]


@pytest.mark.parametrize("action", ["enospc", "eio"])
@pytest.mark.parametrize("point", MBOX_POINTS)
def test_mbox_error_exit_75(root: Path, point: str, action: str) -> None:
    assert store(root, MBOX_SITE)[0] == 0
    before = (root / MBOX_SITE).read_bytes()
    code, err = store(root, MBOX_SITE, f"{point}:{action}")
    assert code == 75
    assert f"injected at fault point {point}" in err.decode()
    assert (root / MBOX_SITE).read_bytes() == before
    assert not (root / f"{MBOX_SITE}.lock").exists()
