"""mailfeed-rmail run as a subprocess: exit statuses, quarantine, stdin and FILE."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mailfeed.envelope import Envelope, encode_block
from tests.integration.mta import RecordingHandler, ServerThread
from tests.support import ROOT, case_bytes, case_json, run, script


def defect_reason(number: int) -> str:
    """Return the reason the H07 case expects for message ``number``."""
    return str(case_json("H07.expected.json")["log_must_name"][f"h07-uid-{number}"])


def rmail(args: list[str], *, stdin: bytes = b"",
          target: str | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MAILFEED_TARGET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    if target is not None:
        env["MAILFEED_TARGET"] = target
    return run([script("mailfeed-rmail"), *args], stdin=stdin, env=env, timeout=60)


def maildir_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/new/*"))


@pytest.mark.parametrize("number", range(1, 7))
def test_rmail_h07_defect_exits_65(tmp_path: Path, number: int) -> None:
    data = case_bytes(f"H07.retr-{number}.eml")
    result = rmail([f"--target=maildir:{tmp_path}"], stdin=data)
    assert result.returncode == 65, result.stderr
    assert defect_reason(number) in result.stderr.decode()
    assert "line " in result.stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_rmail_h07_message_7_delivered(tmp_path: Path) -> None:
    path = tmp_path / "in.eml"
    path.write_bytes(case_bytes("H07.retr-7.eml"))
    root = tmp_path / "mail"
    result = rmail([f"--target=maildir:{root}", str(path)])
    assert result.returncode == 0, result.stderr
    [delivered] = maildir_files(root)
    assert delivered.parent.parent.name == "bob@example.org"
    trace = b"Return-Path: <alice@example.net>\nDelivered-To: bob@example.org\n"
    assert delivered.read_bytes() == trace + case_bytes("H07.eml").replace(b"\r\n", b"\n")


def test_rmail_allow_above_return_path(tmp_path: Path) -> None:
    result = rmail(["--allow-above", "Return-Path"], stdin=case_bytes("H07.retr-6.eml"),
                   target=f"maildir:{tmp_path}")
    assert result.returncode == 0, result.stderr
    [delivered] = maildir_files(tmp_path)
    # The POP3 client's Return-Path above the block is replaced, not kept twice.
    lines = delivered.read_bytes().split(b"\n")
    assert lines[:2] == [b"Return-Path: <alice@example.net>", b"Delivered-To: bob@example.org"]
    assert sum(line.startswith(b"Return-Path:") for line in lines) == 1


def test_rmail_quarantine_copy(tmp_path: Path) -> None:
    data = case_bytes("H07.retr-3.eml")
    qdir = tmp_path / "quarantine"
    result = rmail([f"--target=maildir:{tmp_path / 'mail'}", "--quarantine", str(qdir), "-"],
                   stdin=data)
    assert result.returncode == 65
    [copy] = sorted(qdir.glob("*.eml"))
    assert copy.read_bytes() == data
    reason = copy.with_suffix(".reason").read_text()
    assert reason.startswith("line ")
    assert defect_reason(3) in reason
    assert sorted(p.name for p in qdir.iterdir()) == [copy.name, copy.with_suffix(".reason").name]
    assert str(copy) in result.stderr.decode()
    assert not (tmp_path / "mail").exists()


def test_rmail_no_target_exits_64() -> None:
    result = rmail([], stdin=case_bytes("H07.retr-7.eml"))
    assert result.returncode == 64
    assert "MAILFEED_TARGET" in result.stderr.decode()


def test_rmail_bad_option_exits_64() -> None:
    result = rmail(["--no-such-option"], target="maildir:/nonexistent")
    assert result.returncode == 64


def test_rmail_invalid_target_exits_78() -> None:
    result = rmail([], stdin=case_bytes("H07.retr-7.eml"), target="ftp://example.org")
    assert result.returncode == 78
    assert "ftp://example.org" in result.stderr.decode()


def test_rmail_failed_recipient_exits_69(tmp_path: Path) -> None:
    envelope = Envelope("alice@example.net", ("bob@example.org", ".hidden@example.org"))
    data = encode_block(envelope) + b"Subject: x\n\nbody\n"
    result = rmail([], stdin=data, target=f"maildir:{tmp_path}")
    assert result.returncode == 69, result.stderr
    assert ".hidden@example.org" in result.stderr.decode()
    [delivered] = maildir_files(tmp_path)
    assert delivered.read_bytes() == (b"Return-Path: <alice@example.net>\n"
                                      b"Delivered-To: bob@example.org\n"
                                      b"Subject: x\n\nbody\n")


def test_rmail_deferred_exits_75(tmp_path: Path) -> None:
    handler = RecordingHandler(rcpt_replies={"carol@example.org": "451 4.3.0 try later",
                                             "dave@example.org": "550 5.1.1 unknown"})
    envelope = Envelope("alice@example.net",
                        ("bob@example.org", "carol@example.org", "dave@example.org"))
    data = encode_block(envelope) + b"Subject: x\r\n\r\nbody\r\n"
    with ServerThread(handler) as server:
        result = rmail([f"--target=smtp://127.0.0.1:{server.port}"], stdin=data)
    assert result.returncode == 75, result.stderr
    assert "carol@example.org" in result.stderr.decode()
    assert handler.transactions[0].recipients == ["bob@example.org"]


def test_rmail_smtp_1200_recipients(tmp_path: Path) -> None:
    handler = RecordingHandler(recipient_limit=1000)
    with ServerThread(handler) as server:
        result = rmail(["--max-recipients", "1200", "--target",
                        f"smtp://127.0.0.1:{server.port}"],
                       stdin=case_bytes("H08b.retr-1.eml"))
    assert result.returncode == 0, result.stderr
    got = [rcpt for txn in handler.transactions for rcpt in txn.recipients]
    assert sorted(got) == sorted(case_json("H08b.envelope.json")["recipients"])
    assert len(handler.transactions) == 2


def test_rmail_unexpected_error_exits_75(tmp_path: Path) -> None:
    result = rmail([str(tmp_path / "missing.eml")], target=f"maildir:{tmp_path}")
    assert result.returncode == 75
    assert "missing.eml" in result.stderr.decode()
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "soon"])
def test_rmail_invalid_timeout_exits_64(timeout: str) -> None:
    result = rmail(["--timeout", timeout], stdin=b"x\n", target="smtp://127.0.0.1:1")
    assert result.returncode == 64
    assert f"{timeout!r}" in result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_rmail_closed_stdin_exits_75(tmp_path: Path) -> None:
    argv = ["sh", "-c", 'exec "$@" <&-', "sh", script("mailfeed-rmail"),
            f"--target=maildir:{tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = run(argv, env=env)
    assert result.returncode == 75
    assert "standard input is not open" in result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_rmail_quarantine_unwritable_exits_75(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    folder = blocker / "quarantine"  # below a file, so it cannot be created
    result = rmail([f"--quarantine={folder}"], stdin=b"Subject: x\n\n",
                   target=f"maildir:{tmp_path}")
    assert result.returncode == 75
    text = result.stderr.decode()
    assert f"cannot write to quarantine folder {folder}" in text
    assert "line 1: no block" in text
    assert b"Traceback" not in result.stderr


def test_rmail_repeated_recipient_delivered_once(tmp_path: Path) -> None:
    data = (
        b"X-Mailfeed-Sender: a@example.net\nX-Mailfeed-Recipient-Number: 3\n"
        b"X-Mailfeed-Recipient-Address: b@example.org\n"
        b"X-Mailfeed-Recipient-Address: c@example.org\n"
        b"X-Mailfeed-Recipient-Address: b@example.org\n"
        b"Subject: x\n\nbody\n"
    )
    result = rmail([f"--target=maildir:{tmp_path}"], stdin=data)
    assert result.returncode == 0, result.stderr
    delivered = [path.parent.parent.name for path in maildir_files(tmp_path)]
    assert sorted(delivered) == ["b@example.org", "c@example.org"]
    for path in maildir_files(tmp_path):
        rcpt = path.parent.parent.name
        expected = f"Return-Path: <a@example.net>\nDelivered-To: {rcpt}\nSubject: x\n\nbody\n"
        assert path.read_bytes() == expected.encode()


def test_rmail_null_sender_return_path(tmp_path: Path) -> None:
    data = encode_block(Envelope("", ("Postmaster@example.org",))) + case_bytes("H11.eml")
    result = rmail([f"--target=maildir:{tmp_path}"], stdin=data)
    assert result.returncode == 0, result.stderr
    [delivered] = maildir_files(tmp_path)
    assert delivered.parent.parent.name == "postmaster@example.org"
    trace = b"Return-Path: <>\nDelivered-To: Postmaster@example.org\n"
    original = case_bytes("H11.eml").replace(b"\r\n", b"\n")
    assert delivered.read_bytes() == trace + original
