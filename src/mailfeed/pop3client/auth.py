"""What the POP3 client's login needs besides the dialogue: SASL constants,
the APOP timestamp check and the one helper that masks secrets.

SASL over POP3 follows RFC 5034 section 4; an APOP timestamp must be a
msg-id (RFC 1939 section 7, RFC 5322 section 3.6.4).  :func:`mask_secrets`
is the one place that hides a credential from logs and traces.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "SASL_CANCEL", "SASL_PLAIN", "mask_secrets"]

# SASL over POP3 (RFC 5034 section 4): a server challenge starts with "+ ",
# a client cancels with "*", and the AUTH command line with its initial
# response must fit in 255 octets including CRLF.
SASL_CHALLENGE_PREFIX = b"+ "
SASL_CANCEL = "*"
MAX_AUTH_COMMAND_OCTETS = 255
SASL_PLAIN = "PLAIN"

# msg-id of RFC 5322 section 3.6.4, the form an APOP timestamp must take
# (RFC 1939 section 7).
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_ATOM_TEXT = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_NO_FOLD_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]*\]"
_MSG_ID = re.compile(rf"<{_DOT_ATOM_TEXT}@(?:{_DOT_ATOM_TEXT}|{_NO_FOLD_LITERAL})>")
_ANGLE_TOKEN = re.compile(r"<[^<>]*>")

MASK = "********"


def mask_secrets(line: str, *, sasl_response: bool = False) -> str:
    """Return a command line fit for logs and traces.

    Hides the argument of PASS, the digest of APOP, the initial response of
    AUTH, and a whole SASL response line (``sasl_response=True``) except the
    cancel line ``*``.
    """
    if sasl_response:
        return line if line in ("", SASL_CANCEL) else MASK
    verb, sep, rest = line.partition(" ")
    upper = verb.upper()
    if upper == "PASS" and sep:
        return f"{verb} {MASK}"
    if upper == "APOP" and sep:
        user = rest.partition(" ")[0]
        return f"{verb} {user} {MASK}"
    if upper == "AUTH":
        mechanism, has_response, _ = rest.partition(" ")
        if has_response:
            return f"{verb} {mechanism} {MASK}"
    return line


def _apop_timestamp(greeting: str) -> str | None:
    """Return the greeting's APOP timestamp when it is a valid msg-id."""
    tokens = _ANGLE_TOKEN.findall(greeting)
    if tokens and _MSG_ID.fullmatch(tokens[-1]):
        return str(tokens[-1])
    return None


def _check_argument(name: str, value: str) -> None:
    # A CR or LF in an argument would let it smuggle in a second command.
    if any(char in value for char in "\r\n\0"):
        raise ValueError(f"{name} contains CR, LF or NUL; POP3 cannot carry it")
