"""The one rule for a child's exit status, against Postfix's sys_exits table."""

from __future__ import annotations

import pytest

from mailfeed.errors import ChildStatus, classify_exit_status

# Postfix global/sys_exits.c: EX_OSERR (71) and EX_TEMPFAIL (75) carry a
# 4.x.x status; every other code from 64 to 78 carries a 5.x.x status.
POSTFIX_SOFT = {71, 75}


@pytest.mark.parametrize("status", range(64, 79))
def test_sysexits_follow_postfix(status: int) -> None:
    expected = ChildStatus.TEMPORARY if status in POSTFIX_SOFT else ChildStatus.PERMANENT
    assert classify_exit_status(status) is expected


@pytest.mark.parametrize("status", [1, 2, 63, 79, 126, 127, 255])
def test_status_outside_sysexits_is_temporary(status: int) -> None:
    assert classify_exit_status(status) is ChildStatus.TEMPORARY


@pytest.mark.parametrize("status", [-9, -15, -6])
def test_death_by_signal_is_temporary(status: int) -> None:
    assert classify_exit_status(status) is ChildStatus.TEMPORARY


def test_zero_is_ok() -> None:
    assert classify_exit_status(0) is ChildStatus.OK
