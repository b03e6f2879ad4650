"""Tests for mailfeed.quarantine: one durable copy per content, with its reason."""

from __future__ import annotations

import io
from pathlib import Path

from mailfeed.quarantine import Quarantine


def test_store_once_with_reason(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    data = b"X-Mailfeed-Sender: a@example.net\r\n\r\nbody\r\n"
    first = quarantine.store("mx1", "uid-1", "ab" * 32, io.BytesIO(data), "line 2: no block")
    assert first is not None
    assert first.read_bytes() == data
    reason = first.with_suffix(".reason").read_text()
    assert "uidl: uid-1" in reason
    assert "reason: line 2: no block" in reason
    assert "sha256: " + "ab" * 32 in reason
    again = quarantine.store("mx1", "uid-2", "ab" * 32, io.BytesIO(b"other"), "again")
    assert again is None
    assert first.read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "q" / "mx1").iterdir()) == [
        "ab" * 32 + ".eml", "ab" * 32 + ".reason"]
    assert first.stat().st_mode & 0o777 == 0o600
