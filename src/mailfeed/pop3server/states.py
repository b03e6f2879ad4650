"""POP3 command names, the session states and the commands each state allows.

RFC 1939 section 3: a session moves from AUTHORIZATION to TRANSACTION at a
successful login, and to UPDATE at QUIT; messages are removed only in UPDATE.
"""

from __future__ import annotations

import enum

# Command names as RFC 1939, RFC 2449, RFC 2595 and RFC 5034 spell them.
USER, PASS, APOP, AUTH, STLS, CAPA = "USER", "PASS", "APOP", "AUTH", "STLS", "CAPA"
STAT, LIST, RETR, DELE, NOOP, RSET = "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET"
QUIT, TOP, UIDL = "QUIT", "TOP", "UIDL"


class State(enum.Enum):
    """RFC 1939 section 3 session states."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


# Commands allowed in each state. Any other known command gets ERR_WRONG_STATE.
ALLOWED_COMMANDS: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({USER, PASS, APOP, AUTH, STLS, CAPA, QUIT}),
    State.TRANSACTION: frozenset(
        {STAT, LIST, RETR, DELE, NOOP, RSET, QUIT, TOP, UIDL, CAPA}
    ),
    State.UPDATE: frozenset(),
}
KNOWN_COMMANDS = frozenset().union(*ALLOWED_COMMANDS.values())
