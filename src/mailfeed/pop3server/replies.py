"""POP3 reply texts and response codes as named constants, each citing its RFC section."""

from __future__ import annotations

CRLF = b"\r\n"
# RFC 1939 section 3: a multi-line response ends with a line holding a single dot.
TERMINATOR = b".\r\n"

# -- Replies.  RFC 1939 section 3: every response starts with "+OK" or "-ERR".
OK = "+OK"
ERR = "-ERR"
# Response codes: RFC 2449 section 8 (IN-USE) and RFC 3206 sections 4 and 5.
CODE_IN_USE = "[IN-USE]"
CODE_AUTH = "[AUTH]"
CODE_SYS_TEMP = "[SYS/TEMP]"
CODE_SYS_PERM = "[SYS/PERM]"

# RFC 1939 section 4 (greeting with the APOP timestamp of section 7).
OK_GREETING = "+OK {hostname} POP3 server ready {timestamp}"
# RFC 2449 section 5.
OK_CAPA = "+OK capability list follows"
# RFC 1939 section 7: USER must not reveal whether the mailbox exists.
OK_USER = "+OK send PASS"
# RFC 1939 section 7 (PASS, APOP) and RFC 5034 section 4 (AUTH).
OK_LOGGED_IN = "+OK maildrop locked and ready, {count} messages ({octets} octets)"
# RFC 1939 section 5: STAT is "+OK nn mm".
OK_STAT = "+OK {count} {octets}"
OK_LIST = "+OK {count} messages ({octets} octets)"
OK_LIST_ONE = "+OK {msgnum} {size}"
OK_UIDL = "+OK unique-id listing follows"
OK_UIDL_ONE = "+OK {msgnum} {uidl}"
OK_RETR = "+OK {size} octets"
OK_TOP = "+OK top of message follows"
OK_DELE = "+OK message {msgnum} deleted"
OK_NOOP = "+OK"
OK_RSET = "+OK maildrop has {count} messages ({octets} octets)"
# RFC 1939 section 6: QUIT in AUTHORIZATION, and after a successful UPDATE.
OK_QUIT = "+OK {hostname} POP3 server signing off"
OK_QUIT_UPDATE = "+OK {hostname} POP3 server signing off ({count} messages left)"
# RFC 2595 section 4.
OK_STLS = "+OK begin TLS negotiation"
# Mechanism list for AUTH without an argument (RFC 1734 practice; RFC 5034 requires a name).
OK_AUTH_MECHANISMS = "+OK SASL mechanisms follow"
# RFC 5034 section 4: a server challenge is "+" SP base64.
SASL_CONTINUE = "+ {challenge}"
SASL_CANCEL = "*"

ERR_UNKNOWN_COMMAND = "-ERR unknown command"
ERR_WRONG_STATE = "-ERR command not valid in this state"
ERR_SYNTAX = "-ERR invalid arguments: {detail}"
# RFC 2449 section 4: command lines are at most 255 octets including CRLF.
ERR_LINE_TOO_LONG = "-ERR command line over {limit} octets"
ERR_NO_SUCH_MESSAGE = "-ERR no such message"
ERR_ALREADY_DELETED = "-ERR message {msgnum} already deleted"
ERR_NO_USER = "-ERR send USER first"
# RFC 3206 section 5: [AUTH] for a credentials problem; the same text for an
# unknown user and a wrong password.
ERR_AUTH_FAILED = "-ERR [AUTH] invalid user name or password"
ERR_PLAINTEXT_DISALLOWED = "-ERR [AUTH] plaintext authentication needs TLS here; use STLS"
ERR_AUTH_MECHANISM = "-ERR unsupported SASL mechanism {mechanism}"
# RFC 5034 section 4: "*" from the client cancels, and the server replies -ERR.
ERR_AUTH_CANCELLED = "-ERR authentication cancelled"
ERR_AUTH_MALFORMED = "-ERR malformed SASL response"
# RFC 2449 section 8.1.2.
ERR_IN_USE = "-ERR [IN-USE] maildrop is locked by another session"
ERR_MAILDROP_UNAVAILABLE = "-ERR [SYS/TEMP] maildrop unavailable, try again later"
ERR_NO_MAILDROP = "-ERR [SYS/PERM] no maildrop is configured for this user"
ERR_MESSAGE_UNREADABLE = "-ERR [SYS/TEMP] message {msgnum} cannot be read now"
# RFC 1939 section 6: QUIT reports a failed UPDATE with -ERR.
ERR_UPDATE_FAILED = "-ERR [SYS/TEMP] deleted messages were not removed, try again later"
# RFC 2595 section 4.
ERR_STLS_UNAVAILABLE = "-ERR STLS is not available on this listener"
ERR_TLS_ACTIVE = "-ERR command not permitted when TLS active"
ERR_TOO_MANY_BAD_COMMANDS = "-ERR too many invalid commands, closing the connection"
ERR_TOO_MANY_CONNECTIONS = "-ERR [SYS/TEMP] too many connections, try again later"

IMPLEMENTATION = "mailfeed"
