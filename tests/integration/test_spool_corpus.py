"""The whole real-mail corpus through store_message, and a few through the CLI."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from mailfeed.config import Limits, SiteConfig
from mailfeed.envelope import Envelope, encode_block
from mailfeed.spool import store_message
from tests.integration.fwd_helpers import (
    MAILDIR_SITE,
    MBOX_SITE,
    maildir_files,
    run_fwd,
    write_config,
)
from tests.support import (
    CORPUS_DIR,
    expected_spool_bytes,
    mbox_form,
    need_corpus,
    shared_tmpdir,
    split_mboxrd,
)

ENV = Envelope("sender@example.net", ("rcpt@example.org", "other@example.org"))


def block_for(newline: bytes) -> bytes:
    return encode_block(ENV, newline=newline)


def test_corpus_has_no_mailfeed_fields() -> None:
    for path in need_corpus():
        assert b"\nx-mailfeed-" not in path.read_bytes().lower(), path.name


@pytest.mark.slow
def test_corpus_into_maildir(tmp_path: Path) -> None:
    site = SiteConfig("c", "maildir", tmp_path / "c")
    for path in need_corpus():
        message = path.read_bytes()
        with path.open("rb") as fp:
            stored = store_message(site, ENV, fp, Limits())
        data = Path(stored.location).read_bytes()
        assert data == expected_spool_bytes(block_for, message), path.name
        wsize = len(data) + data.count(b"\n") - data.count(b"\r\n")
        assert stored.location.endswith(f",S={len(data)},W={wsize}"), path.name


@pytest.mark.slow
def test_corpus_into_mbox(tmp_path: Path) -> None:
    site = SiteConfig("c", "mbox", tmp_path / "c")
    files = need_corpus()
    for path in files:
        store_message(site, ENV, io.BytesIO(path.read_bytes()), Limits())
    stored = split_mboxrd(site.path.read_bytes())
    assert len(stored) == len(files)
    for path, (from_, data) in zip(files, stored, strict=True):
        assert from_.startswith(b"From sender@example.net "), path.name
        want = mbox_form(expected_spool_bytes(block_for, path.read_bytes()))
        assert data == want, path.name


# An LF message with a From_ line, a CRLF one, a CR-only one, the largest.
CLI_SAMPLE = ["0001.eml", "1072.eml", "1253.eml", "0891.eml"]


def test_corpus_sample_through_cli() -> None:
    need_corpus()
    root = shared_tmpdir()
    try:
        config = write_config(root)
        sample = [CORPUS_DIR / name for name in CLI_SAMPLE]
        sample.append(max(need_corpus(), key=lambda p: p.stat().st_size))
        for path in sample:
            for site in (MAILDIR_SITE, MBOX_SITE):
                result = run_fwd(
                    ["--config", str(config), site, ENV.sender, *ENV.recipients],
                    path.read_bytes(),
                )
                assert result.returncode == 0, (path.name, result.stderr)
                assert result.stderr == b""
        stored = [p.read_bytes() for p in maildir_files(root)]
        want = [expected_spool_bytes(block_for, p.read_bytes()) for p in sample]
        assert sorted(stored) == sorted(want)
        mbox = [m for _f, m in split_mboxrd((root / MBOX_SITE).read_bytes())]
        assert mbox == [mbox_form(w) for w in want]
    finally:
        shutil.rmtree(root, ignore_errors=True)
