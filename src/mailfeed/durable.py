"""Durability helpers shared by the programs that write files.

A rename or link into a folder survives a crash only once the folder itself
is fsynced (the habit in docs: lock -> write -> flush -> fsync -> rename ->
folder fsync).  This module imports nothing of mailfeed, so any module may
use it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir"]


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename or link into it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
