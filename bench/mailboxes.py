"""Benchmark mailboxes: real messages with a block, a seeded synthetic mix, Maildirs.

Real messages come from the corpus folder (one ``.eml`` per message).  Each
is normalised to LF line ends with any mbox ``From `` first line removed,
because a Maildir stores LF text and a POP3 server adds the CRs.  Each then
gets a mailfeed block on top, as the MX side would store it.  The synthetic mix is a
seeded list of text messages with a chosen size distribution, for size
sweeps and for mailboxes too large to build from the corpus.

A mailbox is built once as a template Maildir and then copied into place for
each run by hard links, so refilling a drained mailbox of 100,000 messages
costs links, not writes.  Maildir file names carry ``,S=`` (size in octets)
and ``,W=`` (size with CRLF line ends) so that Dovecot need not read bodies
to learn sizes.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mailfeed.envelope import Envelope, encode_block

__all__ = [
    "RECIPIENT",
    "SENDER",
    "MailboxTemplate",
    "corpus_messages",
    "durable_write",
    "normalise",
    "synthetic_messages",
    "with_block",
]

SENDER = "sender@example.com"
RECIPIENT = "user@example.org"


def normalise(raw: bytes) -> bytes:
    """Return a message with LF line ends and no mbox ``From `` first line."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text.startswith(b"From "):
        text = text.split(b"\n", 1)[1] if b"\n" in text else b""
    if not text.endswith(b"\n"):
        text += b"\n"
    return text


def with_block(message: bytes, recipient: str = RECIPIENT) -> bytes:
    return encode_block(Envelope(SENDER, (recipient,))) + message


def corpus_messages(folder: Path, count: int) -> list[bytes]:
    """Return ``count`` corpus messages with blocks, cycling through the corpus."""
    files = sorted(folder.glob("*.eml"))
    if not files:
        raise FileNotFoundError(f"no .eml files in {folder}: the corpus is missing")
    cache: dict[Path, bytes] = {}
    messages = []
    for index in range(count):
        path = files[index % len(files)]
        if path not in cache:
            cache[path] = with_block(normalise(path.read_bytes()))
        messages.append(cache[path])
    return messages


def synthetic_messages(count: int, *, seed: int = 1, min_size: int = 512,
                       max_size: int = 8192) -> Iterator[bytes]:
    """Yield ``count`` seeded text messages with log-uniform body sizes in octets."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    line_pool = ["".join(rng.choice(alphabet) for _ in range(72)) + "\n" for _ in range(64)]
    for number in range(count):
        size = int(min_size * (max_size / min_size) ** rng.random())
        header = (f"From: Sender <{SENDER}>\nTo: <{RECIPIENT}>\n"
                  f"Subject: synthetic message {number}\n"
                  f"Message-ID: <bench-{seed}-{number}@example.com>\n\n")
        body_lines = []
        body_size = 0
        while body_size < size:
            line = line_pool[rng.randrange(len(line_pool))]
            body_lines.append(line)
            body_size += len(line)
        yield with_block((header + "".join(body_lines)).encode())


@dataclass
class MailboxTemplate:
    """Template Maildir, built once and copied into place by hard links for each run."""

    path: Path
    count: int
    octets: int

    @classmethod
    def build(cls, path: Path, messages: Iterable[bytes]) -> MailboxTemplate:
        if path.exists():
            shutil.rmtree(path)
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True)
        count = 0
        octets = 0
        for number, message in enumerate(messages):
            virtual = len(message) + message.count(b"\n")
            name = f"{1700000000 + number}.M{number}P1.bench,S={len(message)},W={virtual}:2,"
            (path / "cur" / name).write_bytes(message)
            count += 1
            octets += len(message)
        return cls(path, count, octets)

    def install(self, target: Path, *, owner: tuple[int, int] | None = None,
                limit: int = 0) -> None:
        """Replace ``target`` with a fresh Maildir linking to the template's messages.

        With ``limit``, only the first ``limit`` messages in name order are linked.
        """
        if target.exists():
            shutil.rmtree(target)
        for sub in ("cur", "new", "tmp"):
            (target / sub).mkdir(parents=True)
        source = self.path / "cur"
        dest = target / "cur"
        names = sorted(os.listdir(source))
        if limit:
            names = names[:limit]
        for name in names:
            os.link(source / name, dest / name)
        if owner is not None:
            for directory in (target, target / "cur", target / "new", target / "tmp"):
                os.chown(directory, *owner)
            for name in os.listdir(dest):
                os.chown(dest / name, *owner)

    def messages(self) -> Iterator[bytes]:
        for name in sorted(os.listdir(self.path / "cur")):
            yield (self.path / "cur" / name).read_bytes()


def durable_write(folder: Path, messages: Iterable[bytes]) -> int:
    """Write each message into a Maildir durably; return the number written.

    Per message: create in tmp/, write, fsync the file, rename into new/,
    fsync new/.  This is the floor for any client that delivers durably.
    """
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    new_fd = os.open(folder / "new", os.O_RDONLY | os.O_DIRECTORY)
    written = 0
    try:
        for number, message in enumerate(messages):
            name = f"floor.{os.getpid()}.{number}"
            tmp = folder / "tmp" / name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(message)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, folder / "new" / name)
            os.fsync(new_fd)
            written += 1
    finally:
        os.close(new_fd)
    return written
