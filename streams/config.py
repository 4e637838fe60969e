"""Configuration from the environment: the one place where every setting is read and checked."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

N = TypeVar("N", int, float)


class ConfigError(ValueError):
    """A setting from the environment is malformed; the message names the variable."""


_NATS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NATS_SUBJECT = re.compile(r"^[A-Za-z0-9_*>-]+(\.[A-Za-z0-9_*>-]+)*$")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of the service. Each field is read from ``ORDERS_<FIELD>``.

    database_url: PostgreSQL URL; ``None`` starts an embedded server under ``data_dir``.
    nats_url: NATS URL; ``None`` starts an embedded nats-server under ``data_dir``.
    web_host / web_port: where the HTTP server listens.
    data_dir: embedded servers' data, Faust's own data dir and the files that let the
        publisher find an embedded NATS server.
    batch_size: most messages the agent takes, and the bridge fetches, at once.
    batch_max_wait_ms: how long the agent waits to fill a batch before it writes what it has.
    replay_page_size: rows per keyset page when the view is rebuilt from the log.
    nats_stream / nats_subject / nats_durable: JetStream stream, its subject filter and the
        durable pull consumer the bridge binds.
    nats_ack_wait_s: JetStream redelivers a message not acked within this time; it must be
        longer than a slow batch commit.
    nats_max_ack_pending: most messages handed out and not yet acked: the bound on in-flight work.
    log_uids_max: batches up to this size log each stored order_uid; larger ones log a summary.
    log_format: ``text`` (Faust's format) or ``json`` (one object per line).
    consume: ``False`` makes a read replica: it follows the log and serves, never consumes.
    follow_poll_s: how often the view checks the log for commits it was not told of.
    ready_max_lag: /readyz answers 503 while the view is more events behind the log than this.
    event_loop: ``uvloop`` (default) or ``asyncio``, the worker's event loop.
    http_metrics: count HTTP requests and their latency for /metrics (``False`` saves the
        few microseconds a request this costs).
    apply_schema: create the tables at start; ``False`` for a role that may only SELECT and
        INSERT, the schema being applied by its owner (init-db/).
    """

    database_url: str | None = None
    nats_url: str | None = None
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    data_dir: Path = Path(".data")
    batch_size: int = 1000
    batch_max_wait_ms: int = 20
    replay_page_size: int = 10_000
    nats_stream: str = "ORDERS"
    nats_subject: str = "orders.>"
    nats_durable: str = "orders-writer"
    nats_ack_wait_s: float = 30.0
    nats_max_ack_pending: int = 10_000
    log_uids_max: int = 10
    log_format: str = "text"
    consume: bool = True
    follow_poll_s: float = 1.0
    ready_max_lag: int = 10_000
    event_loop: str = "uvloop"
    apply_schema: bool = True
    http_metrics: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and check every ``ORDERS_*`` variable; ConfigError names the first bad one."""
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            database_url=_url(env, "ORDERS_DATABASE_URL", ("postgres", "postgresql")),
            nats_url=_url(env, "ORDERS_NATS_URL", ("nats", "tls", "ws", "wss")),
            web_host=_text(env, "ORDERS_WEB_HOST", defaults.web_host),
            web_port=_int(env, "ORDERS_WEB_PORT", defaults.web_port, 1, 65535),
            data_dir=Path(_text(env, "ORDERS_DATA_DIR", str(defaults.data_dir))),
            batch_size=_int(env, "ORDERS_BATCH_SIZE", defaults.batch_size, 1, 100_000),
            batch_max_wait_ms=_int(
                env, "ORDERS_BATCH_MAX_WAIT_MS", defaults.batch_max_wait_ms, 1, 60_000
            ),
            replay_page_size=_int(
                env, "ORDERS_REPLAY_PAGE_SIZE", defaults.replay_page_size, 1, 1_000_000
            ),
            nats_stream=_name(env, "ORDERS_NATS_STREAM", defaults.nats_stream),
            nats_subject=_subject(env, "ORDERS_NATS_SUBJECT", defaults.nats_subject),
            nats_durable=_name(env, "ORDERS_NATS_DURABLE", defaults.nats_durable),
            nats_ack_wait_s=_float(
                env, "ORDERS_NATS_ACK_WAIT_S", defaults.nats_ack_wait_s, 1.0, 3600.0
            ),
            nats_max_ack_pending=_int(
                env, "ORDERS_NATS_MAX_ACK_PENDING", defaults.nats_max_ack_pending, 1, 1_000_000
            ),
            log_uids_max=_int(env, "ORDERS_LOG_UIDS_MAX", defaults.log_uids_max, 0, 100_000),
            log_format=_choice(env, "ORDERS_LOG_FORMAT", defaults.log_format, ("text", "json")),
            consume=_bool(env, "ORDERS_CONSUME", defaults.consume),
            apply_schema=_bool(env, "ORDERS_APPLY_SCHEMA", defaults.apply_schema),
            http_metrics=_bool(env, "ORDERS_HTTP_METRICS", defaults.http_metrics),
            event_loop=_choice(
                env, "ORDERS_EVENT_LOOP", defaults.event_loop, ("uvloop", "asyncio")
            ),
            follow_poll_s=_float(env, "ORDERS_FOLLOW_POLL_S", defaults.follow_poll_s, 0.05, 3600.0),
            ready_max_lag=_int(
                env, "ORDERS_READY_MAX_LAG", defaults.ready_max_lag, 0, 1_000_000_000
            ),
        )


def redact(url: str) -> str:
    """The URL with its password, or a lone token (``nats://token@host``), replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    hidden = f"{user}:***" if colon else "***"
    return urlunsplit(parts._replace(netloc=f"{hidden}@{host}"))


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    return _raw(env, name) or default


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    return _number(env, name, default, low, high, int, "a whole number")


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    return _number(env, name, default, low, high, float, "a number")


def _number(
    env: Mapping[str, str],
    name: str,
    default: N,
    low: N,
    high: N,
    parse: Callable[[str], N],
    kind: str,
) -> N:
    raw = _raw(env, name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected {kind}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value}: expected a number from {low} to {high}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _raw(env, name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r}: expected true or false")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _text(env, name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = _raw(env, name)
    if raw is None:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in schemes or (not parts.netloc and not parts.query):
        allowed = ", ".join(f"{scheme}://" for scheme in schemes)
        raise ConfigError(f"{name}={redact(raw)!r}: expected a URL starting with {allowed}")
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked
    except ValueError:
        raise ConfigError(
            f"{name}={redact(raw)!r}: the port is not a number from 0 to 65535"
        ) from None
    return raw


def _name(env: Mapping[str, str], name: str, default: str) -> str:
    value = _text(env, name, default)
    if not _NATS_NAME.match(value):
        raise ConfigError(f"{name}={value!r}: expected 1 to 64 letters, digits, '_' or '-'")
    return value


def _subject(env: Mapping[str, str], name: str, default: str) -> str:
    value = _text(env, name, default)
    if not _NATS_SUBJECT.match(value):
        raise ConfigError(f"{name}={value!r}: expected a NATS subject such as 'orders.>'")
    return value
