"""The bridge's NATS client reads the orders' one header itself: it must read every header
block exactly as nats-py does, and on a real connection."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from bridge.client import BridgeClient

BLOCKS = [
    b"NATS/1.0\r\nNats-Msg-Id: bde5c0994164d8399f767c45test\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id:no-space\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id:   padded  \r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id: caf\xc3\xa9 \xff\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id: a\r\nOther: b\r\n\r\n",
    b"NATS/1.0\r\nOther: b\r\nNats-Msg-Id: a\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Idx: a\r\n\r\n",
    b"NATS/1.0 404 No Messages\r\n\r\n",
    b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1016\r\nNats-Last-Stream: 1024\r\n\r\n",
    b"NATS/1.0 503\r\n\r\n",
]


@pytest.mark.parametrize("block", BLOCKS)
async def test_headers_read_as_nats_py_reads_them(block: bytes) -> None:
    ours = await BridgeClient()._process_headers(block)
    theirs = await Client()._process_headers(block)
    assert ours == theirs
    assert ours is not None


async def test_a_message_with_a_msg_id_arrives_with_it(nats_url: str) -> None:
    nc = BridgeClient()
    await nc.connect(nats_url)
    try:
        subject = nc.new_inbox()
        subscription = await nc.subscribe(subject)
        await nc.publish(subject, b"order", headers={"Nats-Msg-Id": "uid-1"})
        msg = await subscription.next_msg(timeout=5)
    finally:
        await nc.close()
    assert msg.data == b"order"
    assert msg.headers == {"Nats-Msg-Id": "uid-1"}
