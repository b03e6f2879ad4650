"""Fixtures shared by the whole suite."""

from __future__ import annotations

import shutil
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
