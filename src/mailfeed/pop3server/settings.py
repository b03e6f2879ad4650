"""Limits and policy of the POP3 server, and its counters."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

# RFC 1939 section 3: the autologout timer is at least 10 minutes.
RFC_MIN_IDLE_TIMEOUT = 600.0


@dataclass(frozen=True)
class Pop3Settings:
    """Limits and policy of the POP3 server; every limit here is enforced and tested."""

    hostname: str = field(default_factory=socket.gethostname)
    # Accept USER/PASS, APOP and AUTH PLAIN without TLS on any listener.
    allow_plaintext: bool = False
    max_connections: int = 100
    max_connections_per_address: int = 10
    # Seconds from connect to a successful login.
    login_timeout: float = 60.0
    # Seconds without a command after login (RFC 1939 autologout), and the
    # longest wait for a client to take output.
    idle_timeout: float = 600.0
    # Set False only in tests: allows idle_timeout under RFC 1939's 600 s.
    enforce_rfc_idle_minimum: bool = True
    # RFC 2449 section 4: 255 octets including CRLF.
    max_command_octets: int = 255
    # SASL lines (RFC 5034 section 4 lifts the command limit for them).
    max_sasl_octets: int = 8192
    max_bad_commands: int = 10
    # Delay before a failed login's reply: base * 2 ** (failures - 1), capped.
    auth_failure_delay: float = 1.0
    auth_failure_max_delay: float = 15.0
    # Seconds after which an address's failed logins are forgotten.
    auth_failure_window: float = 900.0
    tls_handshake_timeout: float = 30.0
    # Octets of pending output that trigger a write and a wait for drain.
    output_flush_octets: int = 256 * 1024
    # Octets of unprocessed client input before reading pauses.
    max_input_buffer: int = 64 * 1024
    # Octets of each message read on the event loop (in reads of at most this
    # size), because a thread hop costs more than such a read.  The rest of a
    # larger message is read in a thread.  0 sends every open and read to a thread.
    inline_read_octets: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.enforce_rfc_idle_minimum and self.idle_timeout < RFC_MIN_IDLE_TIMEOUT:
            raise ValueError(
                f"idle_timeout = {self.idle_timeout:g} s is under RFC 1939's minimum of "
                f"{RFC_MIN_IDLE_TIMEOUT:g} s; raise it"
            )
        if self.max_command_octets < 255:
            raise ValueError(
                f"max_command_octets = {self.max_command_octets} is under RFC 2449's 255"
            )
        if self.inline_read_octets < 0:
            raise ValueError(f"inline_read_octets = {self.inline_read_octets} must be at least 0")
        for name in ("max_connections", "max_connections_per_address", "max_bad_commands"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be at least 1")


@dataclass
class Pop3Stats:
    """Counters of one server since it started."""

    connections: int = 0
    rejected_connections: int = 0
    logins: int = 0
    failed_logins: int = 0
    # transport.write calls, to observe reply batching.
    writes: int = 0
    messages_sent: int = 0
    messages_removed: int = 0
