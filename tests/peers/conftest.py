"""Session-wide private peers: Postfix (MX and site roles) and Dovecot.

Each fixture starts its peer once per test session (once per pytest-xdist
worker) and stops and deletes it at the end.  Tests share them without
interfering by taking their own site (:meth:`MxPostfix.new_site`), domain
(:meth:`SitePostfix.new_domain`) or POP3 user.

Fixtures:

``mx_spool_root``
    The MX spool folder, owned by the test user.
``postfix_mx``
    :class:`~tests.peers.postfix.MxPostfix`: SMTP on ``instance.smtp_port``,
    site domains piped to mailfeed-fwd as configured in docs/examples.
``postfix_site``
    :class:`~tests.peers.postfix.SitePostfix`: re-injection port, Maildir
    delivery per recipient, ``sendmail`` wrapper using this instance.
``dovecot_spool`` / ``dovecot_spool_mbox``
    :class:`~tests.peers.dovecot.SpoolDovecot`: POP3 (plain with STLS, and
    implicit TLS) over the Maildir or mbox spool; ``dovecot_spool`` is also
    the configuration dovecot-lda uses in the pipe variant.
``dovecot_site``
    :class:`~tests.peers.dovecot.SiteDovecot`: LMTP on a unix socket and a
    TCP port, Maildir per recipient.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.dovecot import SiteDovecot, SpoolDovecot
from tests.peers.postfix import MxPostfix, PostfixInstance, SitePostfix, pool_site_names
from tests.support import ROOT, RUN_USER, free_port, need, run_user_ids, script, shared_tmpdir

# POP3 users whose spools tests fill by hand, without Postfix.
HAND_FILLED_USERS = [f"hand{i}" for i in range(1, 6)]


@pytest.fixture(scope="session")
def mx_spool_root() -> Iterator[Path]:
    path = shared_tmpdir("mailfeed-mx-spool-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postfix_mx(mx_spool_root: Path) -> Iterator[MxPostfix]:
    need("postfix", "postconf", "postmap")
    # pipe(8) clears the environment; mailfeed-fwd must still import this
    # checkout's code.
    instance = PostfixInstance.create("mx", free_port(), {"PYTHONPATH": str(ROOT / "src")})
    try:
        mx = MxPostfix(instance, mx_spool_root, script("mailfeed-fwd"), RUN_USER)
        instance.start()
        yield mx
    finally:
        instance.destroy()


@pytest.fixture(scope="session")
def postfix_site() -> Iterator[SitePostfix]:
    need("postfix", "postconf", "postmap", "sendmail")
    uid, gid = run_user_ids()
    instance = PostfixInstance.create("site", free_port())
    try:
        site = SitePostfix(instance, free_port(), uid, gid)
        instance.start()
        yield site
    finally:
        instance.destroy()


def _spool_dovecot(name: str, example: str, spool_root: Path) -> Iterator[SpoolDovecot]:
    need("dovecot", "doveadm", "openssl")
    users = [*pool_site_names(), *HAND_FILLED_USERS]
    server = SpoolDovecot(name, example, spool_root, users)
    try:
        server.instance.start()
        yield server
    finally:
        server.instance.destroy()


@pytest.fixture(scope="session")
def dovecot_spool(mx_spool_root: Path) -> Iterator[SpoolDovecot]:
    yield from _spool_dovecot("spool", "dovecot/spool-maildir.conf", mx_spool_root)


@pytest.fixture(scope="session")
def dovecot_spool_mbox(mx_spool_root: Path) -> Iterator[SpoolDovecot]:
    yield from _spool_dovecot("spool-mbox", "dovecot/spool-mbox.conf", mx_spool_root)


@pytest.fixture(scope="session")
def dovecot_site() -> Iterator[SiteDovecot]:
    need("dovecot", "doveadm", "openssl")
    server = SiteDovecot("site")
    try:
        server.instance.start()
        yield server
    finally:
        server.instance.destroy()
