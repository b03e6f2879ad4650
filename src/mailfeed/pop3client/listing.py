"""Parsing of the UIDL and LIST replies (RFC 1939 sections 5 and 7).

A unique-id is 1 to 70 octets from 0x21 to 0x7E; a line with a bad,
repeated or unreadable entry is rejected with its reason, never guessed at,
so the caller can leave that message alone.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailfeed.pop3client.transport import _display

__all__ = ["UidlListing", "parse_list_listing", "parse_uidl_listing"]

# A unique-id is 1 to 70 octets in the range 0x21 to 0x7E (RFC 1939 section 7).
MAX_UNIQUE_ID_OCTETS = 70
UNIQUE_ID_MIN_OCTET = 0x21
UNIQUE_ID_MAX_OCTET = 0x7E
# A unique-id without defect (RFC 1939 section 7): 1 to 70 octets in 0x21-0x7E.
_VALID_UNIQUE_ID = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_UNIQUE_ID_OCTETS)


@dataclass(frozen=True)
class UidlListing:
    """The parsed reply to UIDL.

    ``entries`` maps message numbers to valid, unique unique-ids.
    ``defects`` lists each rejected line as ``(raw line, reason)``; a reason
    names the message number where one could be read.
    """

    entries: dict[int, str] = field(default_factory=dict)
    defects: list[tuple[str, str]] = field(default_factory=list)


def parse_uidl_listing(lines: Sequence[bytes]) -> UidlListing:
    """Parse the unstuffed lines of a UIDL reply (without line ends).

    Never raises.  A line is defective when its message number is not a
    positive decimal number, its unique-id is missing, longer than 70 octets,
    contains octets outside 0x21-0x7E, or is followed by more text.  When two
    lines share a message number or a unique-id, every one of them is
    defective, because the client cannot tell which one is true.
    """
    defects: list[tuple[str, str]] = []
    candidates: list[tuple[int, str, bytes]] = []
    numbers_seen: collections.Counter[int] = collections.Counter()

    # The display text of a line is built only for a defect: a listing of
    # 100,000 messages is parsed once per session.
    for line in lines:
        parts = line.split()
        if not parts:
            defects.append((_display(line), "empty UIDL line"))
            continue
        if not parts[0].isdigit() or int(parts[0]) == 0:
            raw = _display(line)
            reason = "message number is not a positive decimal number"
            defects.append((raw, f"UIDL line {raw!r} unparseable: {reason}"))
            continue
        msgnum = int(parts[0])
        numbers_seen[msgnum] += 1
        if len(parts) == 2 and _VALID_UNIQUE_ID.fullmatch(parts[1]):
            candidates.append((msgnum, parts[1].decode("ascii"), line))
            continue
        unique_id_defect = _unique_id_defect(parts)
        if unique_id_defect is not None:
            defects.append((_display(line), f"message {msgnum}: {unique_id_defect}"))
            continue
        candidates.append((msgnum, parts[1].decode("ascii"), line))

    owners: dict[str, list[int]] = collections.defaultdict(list)
    for msgnum, unique_id, _ in candidates:
        owners[unique_id].append(msgnum)

    entries: dict[int, str] = {}
    for msgnum, unique_id, line in candidates:
        if numbers_seen[msgnum] > 1:
            defects.append((_display(line), f"message {msgnum}: listed more than once"))
        elif len(owners[unique_id]) > 1:
            numbers = _join_numbers(owners[unique_id])
            defects.append((_display(line),
                            f"messages {numbers}: duplicate unique-id {unique_id}"))
        else:
            entries[msgnum] = unique_id
    return UidlListing(entries=entries, defects=defects)


def parse_list_listing(lines: Sequence[bytes]) -> tuple[dict[int, int], list[tuple[str, str]]]:
    """Parse the unstuffed lines of a LIST reply into sizes and defects.

    Never raises.  A message listed twice is dropped with both lines.
    """
    defects: list[tuple[str, str]] = []
    sizes: dict[int, int] = {}
    numbers_seen: collections.Counter[int] = collections.Counter()
    parsed: list[tuple[int, int, str]] = []
    for line in lines:
        raw = _display(line)
        parts = line.split()
        if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
            defects.append((raw, f"LIST line {raw!r} unparseable: expected 'msgnum size'"))
            continue
        msgnum = int(parts[0])
        numbers_seen[msgnum] += 1
        parsed.append((msgnum, int(parts[1]), raw))
    for msgnum, size, raw in parsed:
        if numbers_seen[msgnum] > 1:
            defects.append((raw, f"message {msgnum}: listed more than once"))
        else:
            sizes[msgnum] = size
    return sizes, defects


def _unique_id_defect(parts: list[bytes]) -> str | None:
    if len(parts) == 1:
        return "no unique-id"
    if len(parts) > 2:
        return "unexpected text after the unique-id"
    unique_id = parts[1]
    if len(unique_id) > MAX_UNIQUE_ID_OCTETS:
        return f"unique-id longer than {MAX_UNIQUE_ID_OCTETS} octets ({len(unique_id)})"
    if any(not UNIQUE_ID_MIN_OCTET <= octet <= UNIQUE_ID_MAX_OCTET for octet in unique_id):
        return "unique-id contains octets outside 0x21-0x7E"
    return None


def _join_numbers(numbers: Sequence[int]) -> str:
    texts = [str(number) for number in numbers]
    return ", ".join(texts[:-1]) + " and " + texts[-1]
