"""Fixtures shared by the whole suite."""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import shared_tmpdir


@pytest.fixture
def user_tmp() -> Iterator[Path]:
    """A temporary folder owned by the unprivileged test user."""
    path = shared_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    """Undo root handlers that an in-process CLI run installs.

    The commands configure logging to the stderr they start with; under
    pytest that stream is closed after the test, and a later log record
    from a server thread would then fail to write.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A make or CI job that is stopped sends SIGTERM, whose default action
    # skips every fixture teardown and atexit handler and so leaves private
    # Postfix masters and mailfeed mx daemons running.  As KeyboardInterrupt
    # it ends the run the way Ctrl-C does, with teardowns.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
