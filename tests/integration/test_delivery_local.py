"""sendmail target (against a recording script) and Maildir target.

The real Postfix sendmail is exercised by the peer tests; here a small
script records its argv and stdin and exits with a chosen status.
"""

from __future__ import annotations

import errno
import io
import os
import tracemalloc
from pathlib import Path

import pytest

from mailfeed.delivery import MaildirTarget, Outcome, SendmailTarget, target_from_url
from mailfeed.envelope import Envelope, read_block
from tests.support import case_bytes

RECORDER = """#!/bin/sh
dir=$(dirname "$0")
for arg in "$@"; do printf '%s\\n' "$arg"; done > "$dir/argv"
cat > "$dir/stdin"
echo "recorder stderr line" >&2
status=$(cat "$dir/exit")
if [ "$status" = TERM ]; then kill -TERM $$; fi
exit "$status"
"""

TWO = Envelope("alice@example.net", ("bob@example.org", "-oQ/tmp@example.org"))


def recorder(tmp_path: Path, status: str) -> SendmailTarget:
    script = tmp_path / "sendmail"
    script.write_text(RECORDER)
    script.chmod(0o755)
    (tmp_path / "exit").write_text(status)
    target = target_from_url(f"sendmail:{script}", timeout=10)
    assert isinstance(target, SendmailTarget)
    return target


def stored(name: str) -> tuple[Envelope, io.BytesIO]:
    stream = io.BytesIO(case_bytes(name))
    return read_block(stream).envelope, stream


def test_sendmail_argv_and_lf_body(tmp_path: Path) -> None:
    target = recorder(tmp_path, "0")
    envelope, message = stored("H05.retr-1.eml")
    results = target.deliver(envelope, message)
    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == ["-i", "-f", "alice@example.net", "--", "bob@example.org"]
    assert (tmp_path / "stdin").read_bytes() == case_bytes("H05.eml").replace(b"\r\n", b"\n")


def test_sendmail_no_final_newline_gets_lf(tmp_path: Path) -> None:
    target = recorder(tmp_path, "0")
    envelope, message = stored("H05b.spool.eml")
    target.deliver(envelope, message)
    expected = case_bytes("H05b.expected-delivered.eml").replace(b"\r\n", b"\n")
    assert (tmp_path / "stdin").read_bytes() == expected


def test_sendmail_null_sender_and_dash_recipient(tmp_path: Path) -> None:
    target = recorder(tmp_path, "0")
    null = Envelope("", TWO.recipients)
    target.deliver(null, io.BytesIO(b"a\r\nb\rc\n"))
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == ["-i", "-f", "<>", "--", "bob@example.org", "-oQ/tmp@example.org"]
    assert (tmp_path / "stdin").read_bytes() == b"a\nb\nc\n"


@pytest.mark.parametrize(("status", "outcome"), [
    ("0", Outcome.DELIVERED),
    ("75", Outcome.DEFERRED),
    ("67", Outcome.FAILED),
    ("69", Outcome.FAILED),
    ("78", Outcome.FAILED),
    # One rule with the pipe spool: 71 is temporary in Postfix's sys_exits
    # table, and a status outside sysexits (a crash, a shell error) defers.
    ("71", Outcome.DEFERRED),
    ("1", Outcome.DEFERRED),
    ("127", Outcome.DEFERRED),
    ("TERM", Outcome.DEFERRED),
])
def test_sendmail_exit_status(tmp_path: Path, status: str, outcome: Outcome) -> None:
    target = recorder(tmp_path, status)
    results = target.deliver(TWO, io.BytesIO(b"x\n"))
    assert [r.outcome for r in results] == [outcome, outcome]
    if status != "0":
        assert "recorder stderr line" in results[0].text
    if status.isdigit():
        assert results[0].code == int(status)


def test_sendmail_missing_program_defers(tmp_path: Path) -> None:
    target = SendmailTarget(str(tmp_path / "absent"))
    results = target.deliver(TWO, io.BytesIO(b"x\n"))
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]


def test_maildir_bytes_per_recipient(tmp_path: Path) -> None:
    envelope, message = stored("H08.retr-1.eml")
    target = target_from_url(f"maildir:{tmp_path}")
    results = target.deliver(envelope, message)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 3
    original = case_bytes("H08.eml").replace(b"\r\n", b"\n")
    for rcpt in envelope.recipients:
        files = list((tmp_path / rcpt / "new").iterdir())
        assert len(files) == 1
        trace = f"Return-Path: <{envelope.sender}>\nDelivered-To: {rcpt}\n".encode()
        assert files[0].read_bytes() == trace + original
        assert list((tmp_path / rcpt / "tmp").iterdir()) == []


def test_maildir_lower_case_and_final_lf(tmp_path: Path) -> None:
    envelope = Envelope("alice@example.net", ("Bob@Example.ORG",))
    MaildirTarget(tmp_path).deliver(envelope, io.BytesIO(b"a\r\nb\rc"))
    [path] = (tmp_path / "bob@example.org" / "new").iterdir()
    # The folder name is in lower case; Delivered-To keeps the envelope's case.
    assert path.read_bytes() == (b"Return-Path: <alice@example.net>\n"
                                 b"Delivered-To: Bob@Example.ORG\n"
                                 b"a\nb\nc\n")


def test_maildir_null_sender_return_path(tmp_path: Path) -> None:
    envelope = Envelope("", ("bob@example.org",))
    MaildirTarget(tmp_path).deliver(envelope, io.BytesIO(b"Subject: bounce\r\n\r\nx\r\n"))
    [path] = (tmp_path / "bob@example.org" / "new").iterdir()
    assert path.read_bytes() == (b"Return-Path: <>\n"
                                 b"Delivered-To: bob@example.org\n"
                                 b"Subject: bounce\n\nx\n")


def test_maildir_utf8_and_quoted_addresses(tmp_path: Path) -> None:
    sender = '"odd sender"@example.net'
    rcpt = "j\u00f6rg@b\u00fccher.example"
    envelope = Envelope(sender, (rcpt,))
    MaildirTarget(tmp_path).deliver(envelope, io.BytesIO(b"x\n"))
    [path] = (tmp_path / rcpt / "new").iterdir()
    expected = f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\nx\n".encode()
    assert path.read_bytes() == expected


def test_maildir_empty_message_gets_fields(tmp_path: Path) -> None:
    envelope = Envelope("a@example.net", ("bob@example.org",))
    MaildirTarget(tmp_path).deliver(envelope, io.BytesIO(b""))
    [path] = (tmp_path / "bob@example.org" / "new").iterdir()
    assert path.read_bytes() == b"Return-Path: <a@example.net>\nDelivered-To: bob@example.org\n"


def test_maildir_each_copy_names_its_recipient(tmp_path: Path) -> None:
    recipients = ("bob@example.org", "carol@example.org")
    MaildirTarget(tmp_path).deliver(Envelope("a@example.net", recipients), io.BytesIO(b"x\n"))
    for rcpt in recipients:
        [path] = (tmp_path / rcpt / "new").iterdir()
        lines = path.read_bytes().split(b"\n")
        assert lines[1] == f"Delivered-To: {rcpt}".encode()
        assert sum(line.startswith(b"Delivered-To:") for line in lines) == 1


@pytest.mark.parametrize("rcpt", [
    "../../etc@example.org", "a/b@example.org", ".hidden@example.org",
    "x" * 244 + "@example.org",  # 256 octets: a valid address, too long a file name
])
def test_maildir_rejects_unsafe_names(tmp_path: Path, rcpt: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    envelope = Envelope("alice@example.net", (rcpt, "ok@example.org"))
    results = MaildirTarget(root).deliver(envelope, io.BytesIO(b"x\n"))
    assert results[0].outcome is Outcome.FAILED
    assert results[0].recipient == rcpt
    assert results[1].outcome is Outcome.DELIVERED
    assert sorted(p.name for p in root.iterdir()) == ["ok@example.org"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_maildir_symlink_folder_defers(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "bob@example.org").symlink_to(tmp_path / "elsewhere")
    envelope = Envelope("alice@example.net", ("bob@example.org",))
    results = MaildirTarget(tmp_path).deliver(envelope, io.BytesIO(b"x\n"))
    assert results[0].outcome is Outcome.DEFERRED
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_maildir_write_error_defers(tmp_path: Path, code: int,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    envelope = Envelope("alice@example.net", ("bob@example.org",))
    results = MaildirTarget(tmp_path).deliver(envelope, io.BytesIO(b"x\n"))
    assert results[0].outcome is Outcome.DEFERRED
    assert os.strerror(code) in results[0].text
    assert list((tmp_path / "bob@example.org" / "tmp").iterdir()) == []
    assert list((tmp_path / "bob@example.org" / "new").iterdir()) == []


def test_maildir_streams_large_message(tmp_path: Path) -> None:
    line = b"0123456789" * 99 + b"\r\n"  # 992 octets
    size = 16 * 1024 * 1024
    source = tmp_path / "big.eml"
    with source.open("wb") as out:
        for _ in range(size // len(line)):
            out.write(line)
    envelope = Envelope("alice@example.net", ("bob@example.org",))
    tracemalloc.start()
    try:
        with source.open("rb") as message:
            results = MaildirTarget(tmp_path / "mail").deliver(envelope, message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert results[0].outcome is Outcome.DELIVERED
    [written] = (tmp_path / "mail" / "bob@example.org" / "new").iterdir()
    trace = b"Return-Path: <alice@example.net>\nDelivered-To: bob@example.org\n"
    assert written.stat().st_size == len(trace) + (size // len(line)) * (len(line) - 1)
    first_line = line.replace(b"\r\n", b"\n")
    with written.open("rb") as delivered:
        assert delivered.read(len(trace) + len(first_line)) == trace + first_line
    assert peak < 1024 * 1024, f"peak Python allocation {peak} octets for a {size}-octet message"


def test_maildir_name_clash_never_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = MaildirTarget(tmp_path)
    monkeypatch.setattr(target, "_unique_name", lambda: "1.M1P1Q1.host")
    envelope = Envelope("a@example.net", ("bob@example.org",))
    first = target.deliver(envelope, io.BytesIO(b"first\n"))
    second = target.deliver(envelope, io.BytesIO(b"second\n"))
    assert first[0].outcome is Outcome.DELIVERED
    assert second[0].outcome is Outcome.DEFERRED
    [stored] = (tmp_path / "bob@example.org" / "new").iterdir()
    assert stored.read_bytes().endswith(b"\nfirst\n")
    assert list((tmp_path / "bob@example.org" / "tmp").iterdir()) == []


@pytest.mark.timeout(60)
def test_sendmail_that_never_reads_is_killed(tmp_path: Path) -> None:
    # Over the 64 KiB of a pipe buffer: the write blocks unless it is bounded.
    script = tmp_path / "sendmail"
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'pid'}\nexec sleep 600\n")
    script.chmod(0o755)
    target = SendmailTarget(str(script), timeout=1)
    results = target.deliver(TWO, io.BytesIO(b"x" * 1000 + b"\n" * 1024 * 1024))
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]
    assert results[0].text == f"{script} timed out after 1 s and was killed"
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_maildir_batch_defers_folder_fsync_to_sync(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mailfeed.delivery.maildir as maildir_module
    from mailfeed.delivery.base import BatchingTarget

    synced: list[Path] = []
    monkeypatch.setattr(maildir_module, "fsync_dir", synced.append)
    target = MaildirTarget(tmp_path)
    assert isinstance(target, BatchingTarget)
    envelope = Envelope("a@example.net", ("bob@example.org", "carol@example.org"))
    target.deliver(envelope, io.BytesIO(b"Subject: 1\r\n\r\nx\r\n"))
    assert synced == [tmp_path / "bob@example.org" / "new", tmp_path / "carol@example.org" / "new"]
    synced.clear()
    target.begin_batch()
    for _ in range(3):
        results = target.deliver(envelope, io.BytesIO(b"Subject: 2\r\n\r\ny\r\n"))
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 2
    assert synced == []
    target.sync()
    assert synced == [tmp_path / "bob@example.org" / "new", tmp_path / "carol@example.org" / "new"]
    target.sync()
    assert len(synced) == 2
    assert len(list((tmp_path / "bob@example.org" / "new").iterdir())) == 4
