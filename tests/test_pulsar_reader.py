"""The Pulsar reader tells an empty topic from a broker failure: "empty" is established positively
(pulsar-lite cannot answer getLastMessageId on a topic that holds nothing, and pulsar-client says only
UnknownError), never assumed, so a resumed rebuild cannot silently replay nothing."""

from __future__ import annotations

import time
from types import SimpleNamespace

import _pulsar
import pulsar
import pytest

from chainfold.envelope import Event
from chainfold.log.pulsar import PulsarLog, _PulsarReader

from .conftest import unique_topic

pytestmark = pytest.mark.broker


def _asked(*, unknown_error: bool) -> SimpleNamespace:
    """A failed "is more coming?" as the reader records it (pulsar.py ``_Question``)."""
    return SimpleNamespace(asked_at=time.monotonic(), unknown_error=unknown_error)


def _reader(plog: PulsarLog) -> _PulsarReader:
    return _PulsarReader(plog.client, plog.partitions()[0], 5.0)


def test_an_empty_topic_reads_as_empty_and_promptly(pulsar_client) -> None:
    plog = PulsarLog(pulsar_client, unique_topic("empty"))
    t0 = time.monotonic()
    assert list(plog.read()) == []
    assert time.monotonic() - t0 < 10  # it is established, not retried until the budget runs out
    r = _reader(plog)
    native = pulsar_client.create_reader(plog.topic, pulsar.MessageId.earliest)
    try:
        assert r._holds_nothing(native)  # a fresh reader confirms it
        assert r._is_empty(_asked(unknown_error=True), native)
    finally:
        native.close()


def test_an_unknown_error_on_a_topic_that_holds_messages_is_not_emptiness(pulsar_client) -> None:
    plog = PulsarLog(pulsar_client, unique_topic("held"))
    plog.append([Event("e1", "s", None, "T", 1, {})])
    r = _reader(plog)
    native = pulsar_client.create_reader(plog.topic, pulsar.MessageId.earliest)
    try:
        # the same error pulsar-lite gives for an empty topic: here the fresh reader finds the entry
        assert not r._holds_nothing(native)
        assert not r._is_empty(_asked(unknown_error=True), native)
        # and no other failure (a connection error, a timeout) is ever taken for emptiness
        assert not r._is_empty(_asked(unknown_error=False), native)
    finally:
        native.close()
    assert [e.event().id for e in plog.read()] == ["e1"]
