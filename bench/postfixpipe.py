"""A private Postfix whose example.org mail goes through a pipe to mailfeed-fwd.

This is the MX setup that ``mailfeed mx`` replaces: Postfix's smtpd queues
each message (durably), then its pipe(8) transport runs ``mailfeed-fwd SITE
SENDER RECIPIENT`` as user ``mail``, which stores block and message in the
site's spool.  The instance itself comes from the test suite's Postfix
helper (tests/peers/postfix.py), which keeps it on 127.0.0.1 and makes every
other destination bounce.
"""

from __future__ import annotations

from pathlib import Path

from tests.peers.postfix import PostfixInstance

from bench.peers import RUN_USER

__all__ = ["start_postfix_pipe"]


def start_postfix_pipe(smtp_port: int, fwd_program: str, site: str, mx_config: Path,
                       pythonpath: str) -> PostfixInstance:
    """Create and start the instance; the caller must call ``destroy()``."""
    instance = PostfixInstance.create(
        "bench", smtp_port, extra_env={"MAILFEED_CONFIG": str(mx_config),
                                       "PYTHONPATH": pythonpath})
    try:
        instance.write_main_cf({
            "relay_domains": "example.org",
            "transport_maps": f"inline:{{ example.org=mailfeed:{site} }}",
            "mailfeed_destination_recipient_limit": "1000",
        })
        instance.write_master_cf(
            "mailfeed  unix  -       n       n       -       -       pipe\n"
            f"  flags=q user={RUN_USER} argv={fwd_program} ${{nexthop}} ${{sender}} "
            "${recipient}\n")
        instance.start()
    except BaseException:
        instance.destroy()
        raise
    return instance
