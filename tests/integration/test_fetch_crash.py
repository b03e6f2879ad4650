"""Crash safety of ``mailfeed fetch``: SIGKILL at each fault point, then rerun.

Each scenario kills a real ``mailfeed fetch`` process at one or two random
fault points (MAILFEED_FAULT=NAME:kill), then runs it to completion against
the same maildrop, state file and MTA.  Afterwards every recipient has its
copy.  A second copy exists only for deliveries that the MTA accepted in the
batch in progress when the kill came at ``fetch.after_deliver`` (after the
first delivery) or ``fetch.before_record`` (after the whole batch).  That is
the one window: between an accepted delivery and the group commit that
records its batch.  A kill at ``fetch.after_record`` or later leaves no
duplicate.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mailfeed.state import StateStore
from tests.fetch_helpers import MailboxServer, RecordingMta, block_message, write_config
from tests.support import ROOT

FAULT_POINTS = ("fetch.after_retr", "fetch.after_deliver", "fetch.before_record",
                "fetch.after_record", "fetch.after_dele", "fetch.after_quit")
# Kill points inside the window: the batch's deliveries are not recorded yet.
WINDOW_POINTS = ("fetch.after_deliver", "fetch.before_record")
SCENARIOS = 20


def fetch_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "mailfeed.cli", "fetch", "--config", str(config)]


def fetch_env(fault: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + str(ROOT))
    env.pop("MAILFEED_FAULT", None)
    if fault is not None:
        env["MAILFEED_FAULT"] = f"{fault}:kill"
    return env


def run_fetch(config: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fetch_command(config), env=fetch_env(fault), capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SCENARIOS))
def test_kill_at_fault_points(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    messages: list[tuple[str, bytes, list[str]]] = []
    for m in range(rng.randint(1, 4)):
        recipients = [f"m{m}r{k}@example.org" for k in range(rng.randint(1, 3))]
        body = b"Subject: crash %d\r\n\r\nmessage %d of seed %d\r\n" % (m, m, seed)
        messages.append((f"uid-{seed}-{m}", body, recipients))
    mailbox = MailboxServer([(uidl, block_message("alice@example.net", rcpts, body))
                             for uidl, body, rcpts in messages])
    mta = RecordingMta()
    try:
        config = write_config(tmp_path / "site.toml", pop3_port=mailbox.port, mta_url=mta.url,
                              state=tmp_path / "state.sqlite",
                              quarantine=tmp_path / "quarantine")
        allowed_extra: Counter[tuple[str, bytes]] = Counter()
        for fault in rng.sample(FAULT_POINTS, 2):
            before = len(mta.deliveries)
            done = run_fetch(config, fault)
            if done.returncode == -signal.SIGKILL and fault in WINDOW_POINTS:
                # Each run's deliveries form one batch (at most 4 messages).
                assert len(mta.deliveries) > before
                if fault == "fetch.after_deliver":
                    assert len(mta.deliveries) == before + 1
                for delivery in mta.deliveries[before:]:
                    for rcpt in delivery.recipients:
                        allowed_extra[(rcpt, delivery.data)] += 1
            else:
                assert done.returncode in (-signal.SIGKILL, 0), done.stderr
        final = run_fetch(config)
        assert final.returncode == 0, final.stderr
        assert "source mx1:" in final.stdout
    finally:
        mailbox.close()
        mta.close()
    assert mailbox.uidls() == []
    copies: Counter[tuple[str, bytes]] = Counter()
    for delivery in mta.deliveries:
        for rcpt in delivery.recipients:
            copies[(rcpt, delivery.data)] += 1
    for _uidl, body, recipients in messages:
        for rcpt in recipients:
            assert copies[(rcpt, body)] == 1 + allowed_extra[(rcpt, body)], rcpt


def test_duplicate_only_in_deliver_window(tmp_path: Path) -> None:
    body = b"Subject: window\r\n\r\nbody\r\n"
    mailbox = MailboxServer([("w1", block_message("alice@example.net", ["bob@example.org"],
                                                  body))])
    mta = RecordingMta()
    try:
        config = write_config(tmp_path / "site.toml", pop3_port=mailbox.port, mta_url=mta.url,
                              state=tmp_path / "state.sqlite",
                              quarantine=tmp_path / "quarantine")
        killed = run_fetch(config, "fetch.after_deliver")
        assert killed.returncode == -signal.SIGKILL
        assert run_fetch(config).returncode == 0
    finally:
        mailbox.close()
        mta.close()
    assert mta.copies("bob@example.org") == 2


def batch_mailbox(count: int) -> tuple[MailboxServer, list[str]]:
    recipients = [f"r{n}@example.org" for n in range(count)]
    return MailboxServer([
        (f"b{n}", block_message("alice@example.net", [rcpt],
                                b"Subject: batch %d\r\n\r\nbody\r\n" % n))
        for n, rcpt in enumerate(recipients)
    ]), recipients


@pytest.mark.parametrize(("fault", "copies"), [("fetch.before_record", 2),
                                               ("fetch.after_record", 1)])
def test_window_spans_one_batch(tmp_path: Path, fault: str, copies: int) -> None:
    """A kill before the group commit redelivers the whole batch; after it, nothing."""
    mailbox, recipients = batch_mailbox(3)
    mta = RecordingMta()
    try:
        config = write_config(tmp_path / "site.toml", pop3_port=mailbox.port, mta_url=mta.url,
                              state=tmp_path / "state.sqlite",
                              quarantine=tmp_path / "quarantine")
        killed = run_fetch(config, fault)
        assert killed.returncode == -signal.SIGKILL
        assert len(mailbox.uidls()) == 3
        assert run_fetch(config).returncode == 0
    finally:
        mailbox.close()
        mta.close()
    assert mailbox.uidls() == []
    assert [mta.copies(rcpt) for rcpt in recipients] == [copies] * 3


def test_second_fetcher_exits_75(tmp_path: Path) -> None:
    config = write_config(tmp_path / "site.toml", pop3_port=1, mta_url="smtp://127.0.0.1:1",
                          state=tmp_path / "state.sqlite", quarantine=tmp_path / "quarantine")
    with StateStore.open(tmp_path / "state.sqlite"):
        done = run_fetch(config)
    assert done.returncode == 75
    assert "another mailfeed fetch" in done.stderr
    assert str(tmp_path / "state.sqlite.lock") in done.stderr


def test_daemon_polls_and_stops_on_sigterm(tmp_path: Path) -> None:
    mailbox = MailboxServer([("d1", block_message("alice@example.net", ["bob@example.org"],
                                                  b"Subject: one\r\n\r\n1\r\n"))])
    mta = RecordingMta()
    try:
        config = write_config(tmp_path / "site.toml", pop3_port=mailbox.port, mta_url=mta.url,
                              state=tmp_path / "state.sqlite",
                              quarantine=tmp_path / "quarantine",
                              extra_top="[daemon]\ninterval = 1\n")
        process = subprocess.Popen([*fetch_command(config), "--daemon"], env=fetch_env(None),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: mta.copies("bob@example.org") == 1)
            mailbox.add("d2", block_message("alice@example.net", ["carol@example.org"],
                                            b"Subject: two\r\n\r\n2\r\n"))
            wait_for(lambda: mta.copies("carol@example.org") == 1)
            wait_for(lambda: mailbox.uidls() == [])
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        mailbox.close()
        mta.close()
    assert process.returncode == 0, err
    assert "source mx1:" in out
    assert "daemon stopped" in err


def wait_for(condition: object, timeout: float = 30.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
