"""The JetStream objects the service relies on: the orders stream and the durable pull consumer.

The service creates both when they are missing. When they exist, someone else may have made
them, with settings under which orders would be lost or skipped: ``check_stream`` and
``ensure_consumer`` judge what is there. What loses or skips orders is refused (the bridge
does not consume, and says why); what is merely unusual is a warning; consumer settings that
the server lets change in place are changed. The README's "JetStream objects made elsewhere"
lists which is which.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Final

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ReplayPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from streams.config import Settings

log = logging.getLogger(__name__)

# Long enough to absorb a publisher's retries; the server keeps one entry per Nats-Msg-Id seen
# within it, so it also bounds that table.
DUPLICATE_WINDOW_S: Final = 120.0

_STREAM_NAME_IN_USE: Final = 10058
_ACK_WAIT_TOLERANCE_S: Final = 0.001  # the server keeps nanoseconds; settings are seconds


class Refused(Exception):
    """A stream or consumer the service will not consume through, or cannot create. The
    message says what is wrong and what an operator can do about it."""


@dataclasses.dataclass(frozen=True)
class StreamCheck:
    """What ``check_stream`` found: refusals (orders would be lost) and warnings."""

    refusals: tuple[str, ...]
    warnings: tuple[str, ...]


def stream_config(name: str, subjects: list[str], replicas: int = 1) -> StreamConfig:
    """The one definition of the stream, for whoever creates it (service, publisher, tests):
    file storage, the limits retention with no limits, so nothing is deleted before the
    service has it, and the duplicate window that absorbs a publisher's retries."""
    return StreamConfig(
        name=name,
        subjects=subjects,
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


async def ensure_stream(
    js: JetStreamContext, name: str, subjects: list[str], replicas: int = 1
) -> StreamInfo:
    """The stream's info; created from ``stream_config`` unless it exists. An existing stream
    is left as it is: ``check_stream`` says whether the service can rely on it.

    Raises ``Refused`` when the server will not create it (too many replicas for the cluster,
    a subject another stream stores, an account limit).
    """
    try:
        return await js.stream_info(name)
    except NotFoundError:
        pass
    try:
        info = await js.add_stream(stream_config(name, subjects, replicas))
    except ServiceUnavailableError:
        raise  # JetStream busy or not running: worth retrying at the usual pace
    except APIError as error:
        if error.err_code == _STREAM_NAME_IN_USE:
            # Created in the meantime by another worker or a publisher.
            return await js.stream_info(name)
        hint = (
            f" (ORDERS_NATS_REPLICAS={replicas} needs a JetStream cluster of at least"
            f" {replicas} servers)"
            if replicas > 1 and "replica" in str(error.description).lower()
            else ""
        )
        raise Refused(
            f"the server refuses to create stream {name}: {error.description}{hint}"
        ) from None
    log.info(
        "created stream %s (subjects %s, file storage, %d replica(s))",
        name,
        ", ".join(subjects),
        replicas,
    )
    return info


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject that ``subject`` (itself possibly with ``*`` and ``>``) stands
    for is matched by ``pattern``: ``orders.>`` covers ``orders.new`` and ``orders.*``."""
    wanted, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(have) > index
        if index >= len(have) or have[index] == ">":
            return False
        if token != "*" and token != have[index]:
            return False
    return len(wanted) == len(have)


def check_stream(config: StreamConfig, settings: Settings) -> StreamCheck:
    """Judge a stream the service is about to consume from (see the module's docstring)."""
    name = config.name or settings.nats_stream
    refusals: list[str] = []
    warnings: list[str] = []
    subjects = config.subjects or []
    if not any(subject_covers(pattern, settings.nats_subject) for pattern in subjects):
        refusals.append(
            f"its subjects ({', '.join(subjects) or 'none'}) do not cover"
            f" ORDERS_NATS_SUBJECT={settings.nats_subject}, so orders published there are not"
            " stored: add it to the stream's subjects, or set ORDERS_NATS_SUBJECT to one of them"
        )
    if _text(config.storage) == StorageType.MEMORY.value:
        refusals.append(
            "memory storage: orders not yet consumed are lost when the server restarts;"
            " recreate the stream with file storage"
        )
    discard_new = _text(config.discard) == DiscardPolicy.NEW.value
    for field, value in (("max_msgs", config.max_msgs), ("max_bytes", config.max_bytes)):
        if value is None or value <= 0:
            continue
        if discard_new:
            warnings.append(
                f"{field} {value} with discard new: once the stream is full, publishers get"
                " errors (with limits retention consumed orders stay and count too)"
            )
        else:
            refusals.append(
                f"{field} {value} with discard old: the oldest orders are deleted once the"
                f" stream is full, consumed or not; remove the limit (`nats stream edit {name}"
                f" --{field.replace('_', '-')}=-1`) or use discard new"
            )
    per_subject = config.max_msgs_per_subject
    if per_subject is not None and per_subject > 0:
        if discard_new and config.discard_new_per_subject:
            warnings.append(
                f"max_msgs_per_subject {per_subject} with discard new per subject: once a"
                " subject is full, publishers get errors"
            )
        else:
            # Without discard_new_per_subject the server drops a subject's oldest messages
            # whatever the discard policy; all orders usually share one subject.
            refusals.append(
                f"max_msgs_per_subject {per_subject}: the oldest orders on a subject are deleted,"
                f" consumed or not; remove the limit (`nats stream edit {name}"
                " --max-msgs-per-subject=-1`)"
            )
    if config.max_age:
        # Age is enforced whatever the discard policy.
        refusals.append(
            f"max_age {config.max_age:g} s: orders not consumed within it are deleted; remove"
            f" the limit (`nats stream edit {name} --max-age=0`)"
        )
    if _text(config.retention) == RetentionPolicy.INTEREST.value:
        warnings.append(
            f"interest retention: orders published while consumer {settings.nats_durable} does"
            " not exist are not kept"
        )
    if config.duplicate_window < DUPLICATE_WINDOW_S:
        warnings.append(
            f"duplicate window {config.duplicate_window:g} s (the service creates"
            f" {DUPLICATE_WINDOW_S:g} s): a publisher's retry after that is stored twice in the"
            " stream (the event log still keeps the order once)"
        )
    replicas = config.num_replicas or 1
    if replicas < settings.nats_replicas:
        warnings.append(
            f"{replicas} replica(s), fewer than ORDERS_NATS_REPLICAS={settings.nats_replicas}:"
            " the stream does not survive the loss of its server(s); raise it with"
            f" `nats stream edit {name} --replicas {settings.nats_replicas}`"
        )
    return StreamCheck(tuple(refusals), tuple(warnings))


def consumer_config(settings: Settings) -> ConsumerConfig:
    """The durable pull consumer the bridge binds to.

    Deliver all, so the orders published before the consumer existed are consumed too;
    explicit acks, so a message is acked only after its commit; unlimited redeliveries, so a
    message the service could not commit is never dropped; max_ack_pending bounds the work
    handed out and not yet acked. Replicas are left at 0: the consumer inherits the stream's.
    """
    return ConsumerConfig(
        durable_name=settings.nats_durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        replay_policy=ReplayPolicy.INSTANT,
        ack_wait=settings.nats_ack_wait_s,
        max_ack_pending=settings.nats_max_ack_pending,
        max_deliver=-1,
        filter_subject=settings.nats_subject,
    )


async def ensure_consumer(js: JetStreamContext, settings: Settings) -> None:
    """Create the durable consumer, or make an existing one what the service needs.

    An existing consumer is read first. Settings the server cannot change in place (deliver,
    ack and replay policy, push or pull) that differ are refused; the others (filter subject,
    ack wait, max ack pending, max deliver, backoff) are updated, and a server that refuses
    the update is a refusal too. Raises ``Refused`` saying what differs and what to do.
    """
    stream, durable = settings.nats_stream, settings.nats_durable
    remedy = (
        f"delete it with `nats consumer rm {stream} {durable}` (the service then creates its"
        " own, which delivers the stream from its start; orders already in the log are kept"
        " once), or set ORDERS_NATS_DURABLE to another name"
    )
    try:
        existing = (await js.consumer_info(stream, durable)).config
    except NotFoundError:
        try:
            await js.add_consumer(stream, consumer_config(settings))
        except ServiceUnavailableError:
            raise
        except APIError as error:
            raise Refused(
                f"the server refuses to create consumer {durable} on stream {stream}:"
                f" {error.description}"
            ) from None
        return
    fixed, changes = _consumer_differences(existing, settings)
    if fixed:
        raise Refused(
            f"consumer {durable} on stream {stream} is not one this service made, and cannot be"
            f" changed in place: {'; '.join(fixed)}; {remedy}"
        )
    if not changes:
        return
    wanted = consumer_config(settings)
    updated = dataclasses.replace(
        existing,
        name=None,  # the durable name addresses it, as when it was created
        ack_wait=wanted.ack_wait,
        max_ack_pending=wanted.max_ack_pending,
        max_deliver=wanted.max_deliver,
        filter_subject=wanted.filter_subject,
        filter_subjects=None,
        backoff=None,
    )
    try:
        await js.add_consumer(stream, updated)
    except ServiceUnavailableError:
        raise
    except APIError as error:
        raise Refused(
            f"consumer {durable} on stream {stream} differs ({'; '.join(changes)}) and the"
            f" server refuses to update it: {error.description}; {remedy}"
        ) from None
    log.warning("consumer %s on stream %s updated: %s", durable, stream, "; ".join(changes))


def _consumer_differences(
    existing: ConsumerConfig, settings: Settings
) -> tuple[list[str], list[str]]:
    """What differs from ``consumer_config``: (cannot be changed in place, can be)."""
    fixed: list[str] = []
    if existing.deliver_subject:
        fixed.append(f"it is a push consumer (deliver subject {existing.deliver_subject})")
    if _text(existing.deliver_policy) != DeliverPolicy.ALL.value:
        fixed.append(
            f"deliver policy {_text(existing.deliver_policy)}, where the service needs all"
            " (orders published before it would never be consumed)"
        )
    if _text(existing.ack_policy) != AckPolicy.EXPLICIT.value:
        fixed.append(
            f"ack policy {_text(existing.ack_policy)}, where the service needs explicit"
            " (a message must stay unacked until its order is committed)"
        )
    if _text(existing.replay_policy) not in ("", ReplayPolicy.INSTANT.value):
        fixed.append(
            f"replay policy {_text(existing.replay_policy)}, where the service needs instant"
        )
    changes: list[str] = []
    filters = existing.filter_subjects or (
        [existing.filter_subject] if existing.filter_subject else []
    )
    if filters != [settings.nats_subject]:
        changes.append(f"filter subject {', '.join(filters) or 'none'} -> {settings.nats_subject}")
    ack_wait = existing.ack_wait or 0.0
    if abs(ack_wait - settings.nats_ack_wait_s) > _ACK_WAIT_TOLERANCE_S:
        changes.append(f"ack wait {ack_wait:g} s -> {settings.nats_ack_wait_s:g} s")
    if existing.max_ack_pending != settings.nats_max_ack_pending:
        changes.append(
            f"max ack pending {existing.max_ack_pending} -> {settings.nats_max_ack_pending}"
        )
    if existing.max_deliver not in (None, -1):
        changes.append(f"max deliver {existing.max_deliver} -> unlimited")
    if existing.backoff:
        changes.append(f"backoff {existing.backoff} -> none")
    return fixed, changes


def _text(value: object) -> str:
    """An enum field as the server spells it; the client leaves read configs as plain text."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    return "" if value is None else str(value)
