"""Fixtures of the interop matrix: result recording, mailfeed mx, a spool Dovecot.

Every test here takes the ``interop`` fixture and names its pair with
``interop.pair(section, row, column)``.  When the test ends, the fixture
writes the outcome of its setup and call phases as a JSON record (see
:mod:`tests.peers.interop.matrix`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailfeed.config import SiteConfig
from tests.peers.dovecot import SpoolDovecot
from tests.peers.interop.matrix import SECTIONS, PairResult, peer_versions, write_result
from tests.support import ROOT, need, shared_tmpdir

MX_HOSTNAME = "mx.interop.test"
MX_POOL_SIZE = 16
DOVECOT_USERS = [f"d{i:02d}" for i in range(1, 9)]
# The Dovecot user whose Maildir the mailfeed mx pipe site delivers into.
LDA_USER = "d08"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"interop_report_{report.when}", report)


class Interop:
    """Records which pair of the matrix a test covers."""

    def __init__(self) -> None:
        self.key: tuple[str, str, str] | None = None
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """Record what the comparison had to allow for with this peer."""
        self.notes.append(text)

    def pair(self, section: str, row: str, column: str) -> None:
        known = {s.key: s for s in SECTIONS}
        assert section in known, f"unknown section {section!r}"
        assert row in known[section].rows, f"unknown row {row!r} of {section}"
        assert column in known[section].columns, f"unknown column {column!r} of {section}"
        self.key = (section, row, column)


@pytest.fixture(scope="session")
def versions() -> dict[str, str]:
    return peer_versions()


@pytest.fixture
def interop(request: pytest.FixtureRequest, versions: dict[str, str]) -> Iterator[Interop]:
    recorder = Interop()
    yield recorder
    if recorder.key is None:
        return
    reports = [getattr(request.node, f"interop_report_{when}", None)
               for when in ("setup", "call")]
    failed = [r for r in reports if r is not None and r.failed]
    skipped = [r for r in reports if r is not None and r.skipped]
    xfailed = [r for r in reports if r is not None and hasattr(r, "wasxfail")]
    if failed:
        outcome, detail = "failed", _first_line(failed[0].longreprtext)
    elif xfailed:
        outcome, detail = "peer changes bytes", str(xfailed[0].wasxfail)[:600]
    elif skipped:
        outcome, detail = "skipped", _first_line(str(skipped[0].longrepr))
    else:
        outcome, detail = "passed", ""
    section, row, column = recorder.key
    write_result(PairResult(section, row, column, outcome, detail, " ".join(recorder.notes),
                            request.node.nodeid, time.time(), versions))


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("E   "):
            return line[4:].strip()[:300]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


# --- mailfeed mx --------------------------------------------------------------


@dataclass
class MailfeedMx:
    """A running ``mailfeed mx`` with a pool of Maildir sites ``i01``, ``i02``, ..."""

    root: Path
    config: Path
    process: subprocess.Popen[bytes]
    smtp_port: int
    pop3_port: int
    sites: dict[str, SiteConfig]
    passwords: dict[str, str]
    used: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def new_site(self) -> SiteConfig:
        self.used += 1
        if self.used > len(self.sites):
            raise RuntimeError(f"all {len(self.sites)} mailfeed mx sites are in use: "
                               "raise MX_POOL_SIZE")
        return self.sites[f"i{self.used:02d}"]

    def log_tail(self, lines: int = 40) -> str:
        text = (self.root / "mx.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


# The site-role Postfix delivers t001.site.test to t200.site.test and hands
# them out from t001 upwards; the mailfeed mx pool takes them from the top.
SITE_POSTFIX_POOL_TOP = 200


def site_domain(name: str) -> str:
    """The domain of a site: pool site ``iNN`` gets a domain the site-role Postfix delivers."""
    if re.fullmatch(r"i\d\d", name):
        return f"t{SITE_POSTFIX_POOL_TOP + 1 - int(name[1:]):03d}.site.test"
    return f"{name}.interop.test"


def _write_mx_config(root: Path) -> Path:
    config = root / "mx.toml"
    config.write_text(f"""\
spool_root = "{root / 'spool'}"

[mx]
hostname = "{MX_HOSTNAME}"
smtp_listen = ["127.0.0.1:0"]
pop3_listen = ["127.0.0.1:0"]
pop3s_listen = []
passwd_file = "passwd"
min_free_space = 1048576
""")
    return config


@pytest.fixture(scope="session")
def mailfeed_mx(interop_dovecot: SpoolDovecot) -> Iterator[MailfeedMx]:
    """``mailfeed mx`` as a subprocess.

    Its sites are ``i01``... (Maildir), ``mbox`` (an mbox spool) and ``lda``,
    whose spool is a pipe to dovecot-lda of ``interop_dovecot`` for the
    user :data:`LDA_USER`.
    """
    from mailfeed.sitecmd import add_site

    root = shared_tmpdir("mailfeed-interop-mx-")
    (root / "spool").mkdir()
    config = _write_mx_config(root)
    sites: dict[str, SiteConfig] = {}
    passwords: dict[str, str] = {}
    names = [f"i{number:02d}" for number in range(1, MX_POOL_SIZE + 1)]
    for name in [*names, "mbox"]:
        passwords[name] = f"pw-{name}-{os.urandom(6).hex()}"
        # SCRAM-SHA-256 keys let mailfeed fetch log in with SCRAM and still
        # check the USER/PASS and PLAIN logins of the other clients.
        sites[name] = add_site(config, name, domains=[site_domain(name)], addresses=[],
                               spool_format="maildir" if name != "mbox" else "mbox",
                               password=passwords[name], scheme="SCRAM-SHA-256")
    lda = interop_dovecot.instance.lda_argv(LDA_USER)
    with config.open("a") as out:
        out.write(f"""
[sites.lda]
format = "pipe"
command = {json.dumps(lda)}
domains = ["{site_domain('lda')}"]
""")
    sites["lda"] = SiteConfig("lda", "pipe", interop_dovecot.spool_root / LDA_USER,
                              (site_domain("lda"),), (), tuple(lda))
    ready = root / "ready.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with (root / "mx.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mailfeed.cli", "mx", "--config", str(config),
             "--ready-file", str(ready)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (root / "mx.log").read_text(errors="replace")
                pytest.fail(f"mailfeed mx did not start (exit {process.poll()}):\n{log_text}")
            time.sleep(0.02)
        bound = json.loads(ready.read_text())
        yield MailfeedMx(root, config, process, int(bound["smtp"][0][1]),
                         int(bound["pop3"][0][1]), sites, passwords)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def interop_dovecot() -> Iterator[SpoolDovecot]:
    """Dovecot serving a Maildir spool of its own to POP3 clients (users d01, d02, ...)."""
    need("dovecot", "doveadm", "openssl")
    spool_root = shared_tmpdir("mailfeed-interop-dovecot-spool-")
    server = SpoolDovecot("interop", "dovecot/spool-maildir.conf", spool_root, DOVECOT_USERS)
    try:
        server.instance.start()
        yield server
    finally:
        server.instance.destroy()
        shutil.rmtree(spool_root, ignore_errors=True)
