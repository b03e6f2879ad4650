"""Quarantine: durable copies of messages the fetcher keeps on the server.

A message whose block is missing or defective, or that names a recipient
outside the local domains, is not delivered and not deleted.  A copy of its
raw RETR bytes goes to ``<quarantine>/<source>/<sha256>.eml`` so that an
admin can inspect it, with a ``.reason`` file beside it that names the
source, the UIDL, the digest and the reason.  The fetcher also quarantines
a message it deletes after its DSN failed for good, so that it does not
vanish.  Once a quarantined message is delivered (``--retry-quarantined``),
its copy and reason move to ``<quarantine>/<source>/released/``.

Invariants:

* One copy per (source, digest): the copy is named by the SHA-256 digest of
  its bytes, and an existing copy is never written again or replaced.
  The fetcher's state adds the once-per-UIDL rule.
* A copy is complete or absent.  Both files are written to temporary names,
  flushed and fsynced.  Then the reason is renamed into place, the copy is
  hard-linked to its final name (which fails if it exists), and the
  directory is fsynced.  Any failure removes the temporary files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

from mailfeed.durable import fsync_dir

__all__ = ["Quarantine"]


COPY_CHUNK = 64 * 1024
FILE_MODE = 0o600
DIR_MODE = 0o700
# Subfolder of a source's folder for copies whose message was delivered
# later (mailfeed fetch --retry-quarantined).
RELEASED_DIR = "released"


class Quarantine:
    """The quarantine directory of one site."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, source: str, digest: str) -> Path:
        return self.root / source / f"{digest}.eml"

    def store(self, source: str, uidl: str, digest: str, message: BinaryIO,
              reason: str) -> Path | None:
        """Copy ``message`` (read from its start) into quarantine with its reason.

        Return the new copy's path, or None when this content is already
        quarantined for ``source``.  Raise OSError when the copy cannot be
        made durable; nothing partial is left behind then.
        """
        folder = self.root / source
        final = folder / f"{digest}.eml"
        if final.exists():
            return None
        folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        stamp = f".tmp.{os.getpid()}.{time.monotonic_ns()}"
        tmp_copy = folder / f"{digest}.eml{stamp}"
        tmp_reason = folder / f"{digest}.reason{stamp}"
        try:
            message.seek(0)
            with _create(tmp_copy) as out:
                shutil.copyfileobj(message, out, COPY_CHUNK)
                _sync(out)
            text = (
                f"source: {source}\nuidl: {uidl}\nsha256: {digest}\n"
                f"quarantined: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
                f"reason: {_one_line(reason)}\n"
            )
            with _create(tmp_reason) as out:
                out.write(text.encode("utf-8", "backslashreplace"))
                _sync(out)
            os.replace(tmp_reason, folder / f"{digest}.reason")
            try:
                os.link(tmp_copy, final)
            except FileExistsError:
                return None
            fsync_dir(folder)
        finally:
            for leftover in (tmp_copy, tmp_reason):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        fsync_dir(folder)
        return final


    def release(self, source: str, digest: str) -> Path | None:
        """Move a copy and its reason into ``<source>/released/`` once the message is delivered.

        Return the copy's new path, or None when there is no copy.  The
        copy leaves the quarantine folder so that nobody sends it by hand a
        second time, but stays on disk for reference.
        """
        folder = self.root / source
        copy = folder / f"{digest}.eml"
        if not copy.exists():
            return None
        released = folder / RELEASED_DIR
        released.mkdir(mode=DIR_MODE, exist_ok=True)
        reason = folder / f"{digest}.reason"
        if reason.exists():
            os.replace(reason, released / reason.name)
        os.replace(copy, released / copy.name)
        fsync_dir(released)
        fsync_dir(folder)
        return released / copy.name


def _create(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 FILE_MODE)
    return os.fdopen(fd, "wb")


def _sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


def _one_line(text: str) -> str:
    return " ".join(text.split())
