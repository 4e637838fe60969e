"""The JetStream objects the service relies on: the orders stream and the durable pull consumer."""

from __future__ import annotations

import logging
from typing import Final

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from streams.config import Settings

log = logging.getLogger(__name__)

# Long enough to absorb a publisher's retries; the server keeps one entry per Nats-Msg-Id seen
# within it, so it also bounds that table.
DUPLICATE_WINDOW_S: Final = 120.0


async def ensure_stream(js: JetStreamContext, name: str, subjects: list[str]) -> None:
    """Create the stream with file storage unless it exists; an existing stream is left as is."""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=subjects,
                storage=StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW_S,
            )
        )
        log.info("created stream %s (subjects %s, file storage)", name, ", ".join(subjects))
        return
    missing = set(subjects) - set(info.config.subjects or [])
    if missing:
        log.warning(
            "stream %s exists without subject(s) %s; it is left unchanged",
            name,
            ", ".join(sorted(missing)),
        )


async def ensure_consumer(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the durable pull consumer the bridge binds to.

    Explicit acks, so a message is acked only after its commit; unlimited redeliveries, so a
    message the service could not commit is never dropped; max_ack_pending bounds the work
    handed out and not yet acked.
    """
    await js.add_consumer(
        settings.nats_stream,
        ConsumerConfig(
            durable_name=settings.nats_durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=settings.nats_ack_wait_s,
            max_ack_pending=settings.nats_max_ack_pending,
            max_deliver=-1,
            filter_subject=settings.nats_subject,
        ),
    )
