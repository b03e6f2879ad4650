"""The immutable value classes on mailfeed-fwd's path behave as values.

Envelope, Block, Limits, SiteConfig and MxSpoolConfig are plain classes
(not dataclasses, which are slow to import), so these tests pin down what
callers rely on: keyword and positional construction, defaults, equality,
hashing, repr, immutability, replace() and pickling.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from mailfeed.config import Limits, MxSpoolConfig, SiteConfig
from mailfeed.envelope import Block, Envelope, InvalidAddress
from mailfeed.spool import StoredMessage


def test_envelope_equality_and_hash() -> None:
    envelope = Envelope("a@x.org", ("b@y.org", "c@y.org"))
    same = Envelope("a@x.org", ("b@y.org", "c@y.org"))
    assert envelope == same
    assert hash(envelope) == hash(same)
    assert envelope != Envelope("a@x.org", ("b@y.org",))
    assert envelope != ("a@x.org", ("b@y.org", "c@y.org"))


def test_envelope_drops_repeats() -> None:
    envelope = Envelope("", ("b@y.org", "c@y.org", "b@y.org"))
    assert envelope.recipients == ("b@y.org", "c@y.org")


def test_envelope_rejects_bad_values() -> None:
    with pytest.raises(InvalidAddress):
        Envelope("a@x.org", ())
    with pytest.raises(InvalidAddress):
        Envelope("a@x.org", ("<b@y.org>",))


def test_envelope_is_immutable() -> None:
    envelope = Envelope("a@x.org", ("b@y.org",))
    with pytest.raises(AttributeError):
        envelope.sender = "c@x.org"
    with pytest.raises(AttributeError):
        del envelope.recipients
    assert envelope.sender == "a@x.org"


def test_envelope_repr_and_pickle() -> None:
    envelope = Envelope("a@x.org", ("b@y.org",))
    assert repr(envelope) == "Envelope(sender='a@x.org', recipients=('b@y.org',))"
    assert pickle.loads(pickle.dumps(envelope)) == envelope


def test_block_fields_and_equality() -> None:
    envelope = Envelope("a@x.org", ("b@y.org",))
    block = Block(envelope, 80)
    assert block.extensions == {}
    assert block == Block(envelope, 80, {})
    assert block != Block(envelope, 81)
    with pytest.raises(AttributeError):
        block.length = 1


def test_limits_defaults() -> None:
    limits = Limits()
    assert limits.max_message_size == Limits.max_message_size == 100 * 1024 * 1024
    assert limits.max_recipients == 1000
    assert limits.deadline == 300.0
    assert limits.lock_timeout == 30.0


def test_limits_replace() -> None:
    limits = Limits(max_recipients=5, deadline=10.0)
    changed = limits.replace(max_message_size=7)
    assert changed == Limits(max_message_size=7, max_recipients=5, deadline=10.0)
    assert limits.max_message_size == Limits.max_message_size
    assert hash(changed) == hash(Limits(7, 5, 10.0))


def test_limits_are_immutable() -> None:
    limits = Limits()
    with pytest.raises(AttributeError):
        limits.deadline = 1.0


def test_site_config_defaults_and_repr() -> None:
    site = SiteConfig(name="s1", format="maildir", path=Path("/spool/s1"))
    assert site.domains == ()
    assert site.addresses == ()
    assert site.command == ()
    assert repr(site) == (
        "SiteConfig(name='s1', format='maildir', path=PosixPath('/spool/s1'), "
        "domains=(), addresses=(), command=())"
    )
    assert pickle.loads(pickle.dumps(site)) == site


def test_mx_spool_config_defaults() -> None:
    config = MxSpoolConfig("mx.toml", Path("/spool"))
    assert config.sites == {}
    assert config.limits == Limits()
    other = MxSpoolConfig("mx.toml", Path("/spool"))
    assert config == other
    assert config.sites is not other.sites


def test_stored_message_fields() -> None:
    stored = StoredMessage("/spool/s1/new/x", 10, 12)
    assert (stored.location, stored.size, stored.wsize) == ("/spool/s1/new/x", 10, 12)
