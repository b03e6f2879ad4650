"""``mailfeed fetch`` as a command: protocol trace, summary line, config errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.fetch_helpers import MailboxServer, RecordingMta, block_message, write_config
from tests.integration.test_fetch_crash import fetch_command, fetch_env, run_fetch


def test_verbose_trace_masks_password(tmp_path: Path) -> None:
    mailbox = MailboxServer([("v1", block_message("alice@example.net", ["bob@example.org"],
                                                  b"Subject: v\r\n\r\nv\r\n"))])
    mta = RecordingMta()
    try:
        config = write_config(tmp_path / "site.toml", pop3_port=mailbox.port, mta_url=mta.url,
                              state=tmp_path / "state.sqlite",
                              quarantine=tmp_path / "quarantine")
        done = run_fetch_verbose(config)
    finally:
        mailbox.close()
        mta.close()
    assert done[0] == 0, done[2]
    assert "C: RETR 1" in done[2]
    assert "C: PASS" in done[2]
    assert "pw-site1-example" not in done[2]
    summary = [line for line in done[1].splitlines() if line.startswith("source mx1:")]
    assert len(summary) == 1
    for word in ("retrieved 1", "delivered 1", "deferred 0", "failed 0", "quarantined 0",
                 "deleted 1", "octets", " s, exit 0"):
        assert word in summary[0]


def run_fetch_verbose(config: Path) -> tuple[int, str, str]:
    done = subprocess.run([*fetch_command(config), "-v"], env=fetch_env(None),
                          capture_output=True, text=True, timeout=60, check=False)
    return done.returncode, done.stdout, done.stderr


def test_config_error_exit_78(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('state = "s"\n')
    done = run_fetch(config)
    assert done.returncode == 78
    assert str(config) in done.stderr
    assert "quarantine" in done.stderr


def test_missing_files_exit_78(tmp_path: Path) -> None:
    config = write_config(tmp_path / "site.toml", pop3_port=1, mta_url="smtp://127.0.0.1:1",
                          state=tmp_path / "missing" / "state.sqlite",
                          quarantine=tmp_path / "quarantine",
                          source_extra='ca_file = "/nonexistent/ca.pem"')
    done = run_fetch(config)
    assert done.returncode == 78, done.stderr
    assert "source[0].ca_file = '/nonexistent/ca.pem': file not found" in done.stderr
    config.write_text(config.read_text().replace('ca_file = "/nonexistent/ca.pem"', ""))
    done = run_fetch(config)
    assert done.returncode == 78, done.stderr
    assert f"state = '{tmp_path}/missing/state.sqlite'" in done.stderr
