"""The fetcher against the shared failure cases, each checked against its expected.json.

Every session runs the real engine against tests/scripted_pop3.py replaying
the case's dialogue on 127.0.0.1, and delivers over SMTP into a recording
aiosmtpd server with the case's scripted replies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailfeed.delivery import target_from_url
from mailfeed.errors import EX_DATAERR, EX_OK, EX_TEMPFAIL
from mailfeed.fetch import Fetcher, RunReport, dsn_sender_for
from mailfeed.fetchconfig import load_fetch_config
from mailfeed.state import StateStore
from tests.fetch_helpers import RecordingMta, write_config
from tests.scripted_pop3 import Pop3Script, ScriptedPop3Server, make_tls_material
from tests.support import case_bytes, case_json


@dataclass
class Session:
    report: RunReport
    server: ScriptedPop3Server
    log: str

    @property
    def exit_code(self) -> int:
        return self.report.exit_code

    def uidl_of(self, msgnum: int) -> str | None:
        message = self.server.script.messages.get(msgnum)
        return None if message is None else message.uidl

    def deleted_uidls(self) -> list[str | None]:
        return [self.uidl_of(n) for n in self.server.dele_received]


class Site:
    """A site under test: state, quarantine and the local MTA persist across sessions."""

    def __init__(self, tmp: Path, mta: RecordingMta) -> None:
        self.tmp = tmp
        self.mta = mta
        self.local_domains: tuple[str, ...] = ("example.org",)

    def session(self, dialogue: str, caplog: pytest.LogCaptureFixture, *, limits: str = "",
                tls: str = "none", with_tls: bool = False) -> Session:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mailfeed"):
            report, server = asyncio.run(self._run(dialogue, limits, tls, with_tls))
        return Session(report, server, caplog.text)

    async def _run(self, dialogue: str, limits: str, tls: str,
                   with_tls: bool) -> tuple[RunReport, ScriptedPop3Server]:
        material = make_tls_material(self.tmp) if with_tls else None
        extra = f'tls = "{tls}"\n' if tls != "none" else ""
        if material is not None:
            extra += f'ca_file = "{material.cert_file}"\n'
        async with ScriptedPop3Server(Pop3Script.from_dialogue(dialogue),
                                      tls=material) as server:
            path = write_config(self.tmp / "site.toml", pop3_port=server.port,
                                mta_url=self.mta.url, state=self.tmp / "state.sqlite",
                                quarantine=self.tmp / "quarantine", limits=limits,
                                local_domains=self.local_domains)
            if extra:
                text = path.read_text().replace('tls = "none"\n', extra)
                path.write_text(text)
            config = load_fetch_config(path)
            target = target_from_url(config.delivery)
            with StateStore.open(config.state) as store:
                fetcher = Fetcher(config, store, target,
                                  dsn_sender=dsn_sender_for(target, config.dsn_reporting_mta))
                report = await fetcher.run()
        return report, server


@pytest.fixture
def mta() -> Iterator[RecordingMta]:
    server = RecordingMta()
    yield server
    server.close()


@pytest.fixture
def site(tmp_path: Path, mta: RecordingMta) -> Site:
    return Site(tmp_path, mta)


def delivered(mta: RecordingMta) -> list[tuple[str, list[str], bytes]]:
    return [(d.sender, d.recipients, d.data) for d in mta.deliveries]


def expected_deliveries(items: list[dict[str, Any]]) -> list[tuple[str, list[str], bytes]]:
    return [(d["sender"], d["recipients"], case_bytes(d["message_file"])) for d in items]


def check_not_sent(session: Session, forbidden: list[str]) -> None:
    for command in forbidden:
        assert not session.server.sent(command), f"client sent {command}"


def check_case(site: Site, session: Session, expected: dict[str, Any]) -> None:
    assert delivered(site.mta) == expected_deliveries(expected["deliveries"])
    if "dele_uidls" in expected:
        assert sorted(session.deleted_uidls()) == sorted(expected["dele_uidls"])
        assert session.server.quit_received
    for uidl in expected.get("remaining_uidls", []):
        assert uidl not in session.deleted_uidls()
    check_not_sent(session, expected.get("client_must_not_send", []))


@pytest.mark.parametrize("variant", ["a", "b"])
def test_h01_starttls_required(site: Site, caplog: pytest.LogCaptureFixture,
                               variant: str) -> None:
    expected = case_json("H01.expected.json")["variants"][variant]
    session = site.session(f"H01{variant}.pop3-dialogue.txt", caplog, tls="starttls")
    check_case(site, session, expected)
    assert session.exit_code == EX_TEMPFAIL
    assert "STLS" in session.log


def test_h01c_injected_reply_ignored(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H01.expected.json")["variants"]["c"]
    session = site.session("H01c.pop3-dialogue.txt", caplog, tls="starttls", with_tls=True)
    handshake_failed, delivered_once = expected["acceptable_outcomes"]
    if session.exit_code == EX_OK:
        check_case(site, session, delivered_once)
        # USER only after the handshake, which the server counted.
        assert session.server.tls_established == 1
    else:
        check_case(site, session, handshake_failed)
        assert session.exit_code == EX_TEMPFAIL


def test_h03_bad_uidl_lines(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H03.expected.json")
    session = site.session("H03.pop3-dialogue.txt", caplog)
    assert delivered(site.mta) == expected_deliveries(expected["deliveries"])
    assert sorted(session.server.dele_received) == expected["dele_msgnums"]
    check_not_sent(session, expected["client_must_not_send"])
    for text in expected["log_must_name"]:
        # "..." in an expected text stands for the rest of the quoted line.
        pattern = ".*".join(re.escape(part) for part in text.split(" ..."))
        assert re.search(pattern, session.log), text
    assert session.exit_code == EX_OK


def test_h03_other_sources_still_polled(tmp_path: Path, mta: RecordingMta,
                                        caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> RunReport:
        bad = ScriptedPop3Server(Pop3Script.from_dialogue("H04.pop3-dialogue.txt"))
        good = ScriptedPop3Server(Pop3Script.from_dialogue("H03.pop3-dialogue.txt"))
        async with bad, good:
            path = write_config(tmp_path / "site.toml", pop3_port=0, mta_url=mta.url,
                                state=tmp_path / "state.sqlite",
                                quarantine=tmp_path / "quarantine",
                                sources=[("broken", bad.port), ("good", good.port)])
            config = load_fetch_config(path)
            with StateStore.open(config.state) as store:
                return await Fetcher(config, store, target_from_url(config.delivery)).run()

    report = asyncio.run(run())
    assert [s.source for s in report.sources] == ["broken", "good"]
    assert report.sources[0].exit_code == EX_TEMPFAIL
    assert report.sources[1].delivered == 2
    assert report.exit_code == EX_TEMPFAIL


def test_h04_plus_err_is_failure(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H04.expected.json")
    session = site.session("H04.pop3-dialogue.txt", caplog)
    assert delivered(site.mta) == []
    check_not_sent(session, expected["client_must_not_send"])
    assert session.exit_code == EX_TEMPFAIL
    assert "+ERR internal error while opening the mailbox" in session.log


@pytest.mark.parametrize(("dialogue", "variant"), [("H05", "a"), ("H05b", "b")])
def test_h05_dot_stuffing(site: Site, caplog: pytest.LogCaptureFixture, dialogue: str,
                          variant: str) -> None:
    expected = case_json("H05.expected.json")["variants"][variant]
    session = site.session(f"{dialogue}.pop3-dialogue.txt", caplog)
    check_case(site, session, expected)
    assert session.exit_code == EX_OK


def test_h07_bad_blocks_quarantined(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H07.expected.json")
    session = site.session("H07.pop3-dialogue.txt", caplog)
    check_case(site, session, expected)
    for uidl, reason in expected["log_must_name"].items():
        lines = [line for line in session.log.splitlines() if uidl in line and reason in line]
        assert lines, f"no log line names {uidl} with {reason!r}"
    copies = sorted((site.tmp / "quarantine" / "mx1").glob("*.eml"))
    assert len(copies) == 6
    assert len(list((site.tmp / "quarantine" / "mx1").glob("*.reason"))) == 6
    # A second session quarantines nothing again and still deletes nothing.
    again = site.session("H07.pop3-dialogue.txt", caplog)
    assert sorted((site.tmp / "quarantine" / "mx1").glob("*.eml")) == copies
    assert "kept on the server" not in again.log
    for uidl in expected["remaining_uidls"]:
        assert uidl not in again.deleted_uidls()


def test_foreign_recipient_quarantined(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    site.local_domains = ("example.com",)
    session = site.session("H10.pop3-dialogue.txt", caplog)
    assert delivered(site.mta) == []
    assert session.server.dele_received == []
    assert session.exit_code == EX_DATAERR
    assert "outside local_domains" in session.log
    # The three copies share their content after the block only: three quarantined copies.
    assert len(list((site.tmp / "quarantine" / "mx1").glob("*.eml"))) == 3


def test_h08a_several_recipients(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H08.expected.json")["variants"]["a"]
    session = site.session("H08.pop3-dialogue.txt", caplog)
    check_case(site, session, expected)


def test_h08b_recipient_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H08.expected.json")["variants"]["b"]
    limit = expected["local_mta"]["smtpd_recipient_limit"]
    envelope = case_json("H08b.envelope.json")
    mta = RecordingMta(recipient_limit=limit)
    try:
        site = Site(tmp_path, mta)
        session = site.session("H08b.pop3-dialogue.txt", caplog)
        assert len(mta.deliveries) >= 2
        for rcpt in envelope["recipients"]:
            assert mta.copies(rcpt) == 1, rcpt
        assert all(d.sender == envelope["sender"] for d in mta.deliveries)
        assert all(d.data == case_bytes("H08b.eml") for d in mta.deliveries)
        assert session.deleted_uidls() == expected["dele_uidls"]
        assert session.exit_code == EX_OK
    finally:
        mta.close()


@pytest.mark.parametrize("case", ["H09", "H10", "H11", "H22", "H23"])
def test_simple_cases(site: Site, caplog: pytest.LogCaptureFixture, case: str) -> None:
    expected = case_json(f"{case}.expected.json")
    session = site.session(f"{case}.pop3-dialogue.txt", caplog)
    check_case(site, session, expected)
    assert session.exit_code == EX_OK
    if case == "H10":
        for rcpt, copies in expected["copies_per_recipient"].items():
            assert site.mta.copies(rcpt) == copies
    if case == "H11":
        assert site.mta.deliveries[0].sender == ""
    if case == "H22":
        assert "BODY=8BITMIME" in site.mta.deliveries[0].mail_options


def test_h15_migration_no_redelivery(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H15.expected.json")
    first_expected, second_expected = expected["sessions"]
    first = site.session("H15.session1.pop3-dialogue.txt", caplog)
    assert delivered(site.mta) == expected_deliveries(first_expected["deliveries"])
    assert first.exit_code == EX_TEMPFAIL
    assert "deleted UIDL" not in first.log
    site.mta.deliveries.clear()
    second = site.session("H15.session2.pop3-dialogue.txt", caplog)
    assert delivered(site.mta) == expected_deliveries(second_expected["deliveries"])
    assert sorted(second.deleted_uidls()) == sorted(second_expected["dele_uidls"])
    assert second.exit_code == EX_OK
    assert "taking over its record" in second.log


def h16_mta() -> RecordingMta:
    poison = case_bytes("H16.4.eml")
    reply = case_json("H16.expected.json")["local_mta"]["h16-uid-4"]
    return RecordingMta(data_code=lambda data: reply if data == poison else None)


def test_h16_crash_and_poison(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H16.expected.json")
    one, two, three = expected["sessions"]
    mta = h16_mta()
    try:
        site = Site(tmp_path, mta)
        # The first dialogue resets the connection after DELE 3, so three RETRs match it.
        first = site.session("H16.session1.pop3-dialogue.txt", caplog,
                             limits="max_messages_per_session = 3")
        assert delivered(mta) == expected_deliveries(one["deliveries"])
        assert first.exit_code != EX_OK
        assert "deleted UIDL" not in first.log
        mta.deliveries.clear()

        second = site.session("H16.session2.pop3-dialogue.txt", caplog)
        assert delivered(mta) == expected_deliveries(two["deliveries"])
        check_not_sent(second, two["client_must_not_send"])
        assert sorted(second.deleted_uidls()) == sorted(two["dele_uidls"])
        assert second.exit_code == EX_TEMPFAIL
        assert "h16-uid-4" in second.log
        assert "h16-uid-4" in second.report.sources[0].summary()
        mta.deliveries.clear()

        third = site.session("H16.session3.pop3-dialogue.txt", caplog)
        assert delivered(mta) == three["deliveries"]
        assert third.server.dele_received == []
        assert third.exit_code == EX_TEMPFAIL
        assert "h16-uid-4" in third.log
    finally:
        mta.close()


def test_h18a_long_lines(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H18.expected.json")["variants"]["a"]
    session = site.session("H18.pop3-dialogue.txt", caplog)
    check_case(site, session, expected)


def test_h18b_line_limit_raised(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H18.expected.json")["variants"]["b"]
    limit = expected["with_max_line_length_at_least"]
    session = site.session("H18b.pop3-dialogue.txt", caplog,
                           limits=f"max_line_length = {limit}")
    check_case(site, session, expected)


def test_h18b_line_limit_default(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    expected = case_json("H18.expected.json")["variants"]["b"]["with_max_line_length_1048576"]
    session = site.session("H18b.pop3-dialogue.txt", caplog,
                           limits="max_line_length = 1048576")
    check_case(site, session, expected)
    line = [row for row in session.log.splitlines() if "h18b-uid-1" in row and "kept" in row]
    assert line
    for word in expected["log_must_name"]:
        assert word in line[0]
    assert session.server.quit_received


def test_expected_files_are_json() -> None:
    # The case tests above read these; a malformed file must fail loudly.
    for name in ("H01", "H03", "H04", "H05", "H07", "H08", "H09", "H10", "H11", "H15", "H16",
                 "H18", "H22", "H23"):
        assert isinstance(json.loads(case_bytes(f"{name}.expected.json")), dict)
