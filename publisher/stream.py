"""Making sure a JetStream stream stores the subject before anything is published to it."""

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from bridge import jetstream


class StreamError(Exception):
    """The stream cannot be found or created."""


def stream_subjects(subject: str, service_filter: str | None = None) -> list[str]:
    """The subjects of a stream created for publishing to ``subject``.

    The service's own subject filter when it captures ``subject``, so that the stream is the
    one the service would have created; otherwise the subject's first-token family:
    ``orders.new`` gives ``orders.>``.
    """
    if service_filter and jetstream.subject_covers(service_filter, subject):
        return [service_filter]
    head, dot, _ = subject.partition(".")
    return [f"{head}.>"] if dot else [subject]


async def ensure_stream(
    js: JetStreamContext,
    name: str,
    subject: str,
    service_filter: str | None = None,
    replicas: int = 1,
) -> str | None:
    """Create stream ``name`` for ``subject`` unless some stream already stores ``subject``.

    ``service_filter`` is the service's subject filter (``$ORDERS_NATS_SUBJECT``), if known;
    see ``stream_subjects``. The stream is the service's own definition
    (``bridge.jetstream.stream_config``, with ``replicas``); an existing stream is never
    modified. Returns a
    warning when ``subject`` is stored by a stream with another name, else ``None``. Raises
    ``StreamError`` when JetStream is unavailable or stream ``name`` exists but does not
    capture ``subject``.
    """
    try:
        try:
            owner = await js.find_stream_name_by_subject(subject)
        except nats.js.errors.NotFoundError:
            owner = None
        if owner is not None:
            if owner != name:
                return (
                    f"subject {subject} is stored by stream {owner}, not {name}; publishing there"
                )
            return None

        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            pass
        else:
            subjects = ", ".join(info.config.subjects or []) or "none"
            raise StreamError(
                f"stream {name} exists but does not capture subject {subject}"
                f" (its subjects: {subjects})"
            )

        try:
            # Someone (usually the service starting up) may create it between our checks:
            # ensure_stream then takes theirs.
            await jetstream.ensure_stream(
                js, name, stream_subjects(subject, service_filter), replicas
            )
        except jetstream.Refused as error:
            raise StreamError(str(error)) from None
        return None
    except (
        nats.js.errors.ServiceUnavailableError,
        nats.errors.NoRespondersError,
        nats.errors.TimeoutError,
    ):
        raise StreamError(
            "JetStream is not available on this server (is nats-server running with -js?)"
        ) from None
    except nats.js.errors.APIError as error:
        raise StreamError(f"cannot set up stream {name}: {error.description or error}") from None
