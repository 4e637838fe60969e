"""Acks for JetStream messages, a whole settled fetch written to NATS in one piece.

nats-py's ``Msg.ack`` is one ``Client.publish`` a message: a coroutine awaited, the reply
subject checked, a PUB frame built and queued, for each of a fetch's thousand messages (about
4 % of the worker's CPU while ingesting, bench/findings.md). The outcomes of a fetch are known
all at once, so here its frames are built in one go, queued as one buffer and flushed once.
The server sees what ``Msg.ack``, ``Msg.nak`` and ``Msg.in_progress`` send, one PUB to each
message's own reply subject: every message is still acked by itself (AckExplicit), and only
once its outcome is known.

Why not one ack per fetch with ``AckPolicy.ALL``: an ack there acks every message of the
consumer with a lower sequence, which includes messages other workers bound to the same durable
consumer hold uncommitted (docs/scaling.md), a message of this worker nakked after a failed
commit and waiting for its redelivery, and redelivered messages in another fetch still in
flight. Any of them would be acked before it is committed, and lost if its worker then died.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol.command import pub_cmd

# Msg.ack publishes an empty payload, which JetStream takes as +ACK.
ACK: Final = b""
PROGRESS: Final = Msg.Ack.Progress


def nak(delay_s: float) -> bytes:
    """A nak asking for redelivery after ``delay_s`` seconds, as ``Msg.nak(delay=…)`` says it."""
    return Msg.Ack.Nak + b' {"delay": %d}' % int(delay_s * 1e9)


async def reply_all(nc: Client, replies: Iterable[tuple[Msg, bytes]]) -> None:
    """Publish each payload to its message's reply subject, in one write and one flush.

    Raises as ``Client.publish`` does on a closed or draining connection. While the
    connection is away the frames wait in nats-py's outgoing buffer, as a publish's would,
    and are refused when the buffer is full.
    """
    # The checks Client.publish makes before it queues a frame.
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    # A message without a reply subject cannot be acked (Msg.ack raises for it): an empty
    # subject would be a malformed frame, and the server would close the connection.
    frames = b"".join(pub_cmd(msg.reply, "", payload) for msg, payload in replies if msg.reply)
    if not nc.is_connected and (
        nc._max_pending_size <= 0 or len(frames) + nc._pending_data_size > nc._max_pending_size
    ):
        # As Client.publish: while reconnecting, frames are kept only up to the buffer's size.
        raise nats.errors.OutboundBufferLimitError
    if frames:
        # Client._send_command and _flush_pending are what Client.publish does after building
        # its frame (nats-py 2.x); tests/test_acks.py checks the bytes the server receives.
        await nc._send_command(frames)
        await nc._flush_pending()
