"""Settings come from the environment, checked at the edge; a bad value names its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import ConfigError, Settings, redact


def test_defaults_when_nothing_is_set() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.database_url is None and settings.nats_url is None
    assert (settings.web_port, settings.data_dir) == (8080, Path(".data"))


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "ORDERS_DATABASE_URL": "postgresql://u:p@db:5432/orders",
            "ORDERS_NATS_URL": "nats://nats:4222",
            "ORDERS_WEB_HOST": "0.0.0.0",
            "ORDERS_WEB_PORT": "9000",
            "ORDERS_DATA_DIR": "/var/lib/orders",
            "ORDERS_BATCH_SIZE": "250",
            "ORDERS_BATCH_MAX_WAIT_MS": "5",
            "ORDERS_REPLAY_PAGE_SIZE": "500",
            "ORDERS_NATS_STREAM": "S",
            "ORDERS_NATS_SUBJECT": "a.b.>",
            "ORDERS_NATS_DURABLE": "d",
            "ORDERS_NATS_ACK_WAIT_S": "12.5",
            "ORDERS_NATS_MAX_ACK_PENDING": "77",
            "ORDERS_LOG_UIDS_MAX": "0",
            "ORDERS_LOG_FORMAT": "JSON",
            "ORDERS_CONSUME": "no",
            "ORDERS_FOLLOW_POLL_S": "0.5",
            "ORDERS_READY_MAX_LAG": "5",
            "ORDERS_EVENT_LOOP": "asyncio",
            "ORDERS_APPLY_SCHEMA": "false",
            "ORDERS_HTTP_METRICS": "off",
        }
    )
    assert settings == Settings(
        database_url="postgresql://u:p@db:5432/orders",
        nats_url="nats://nats:4222",
        web_host="0.0.0.0",
        web_port=9000,
        data_dir=Path("/var/lib/orders"),
        batch_size=250,
        batch_max_wait_ms=5,
        replay_page_size=500,
        nats_stream="S",
        nats_subject="a.b.>",
        nats_durable="d",
        nats_ack_wait_s=12.5,
        nats_max_ack_pending=77,
        log_uids_max=0,
        log_format="json",
        consume=False,
        follow_poll_s=0.5,
        ready_max_lag=5,
        event_loop="asyncio",
        apply_schema=False,
        http_metrics=False,
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ORDERS_WEB_PORT", "0", "ORDERS_WEB_PORT=0: expected a number from 1 to 65535"),
        ("ORDERS_NATS_ACK_WAIT_S", "soon", "ORDERS_NATS_ACK_WAIT_S='soon': expected a number"),
        ("ORDERS_DATABASE_URL", "postgresql://h:99999/db", "the port is not a number"),
        ("ORDERS_DATABASE_URL", "localhost", "expected a URL starting with postgres://"),
        ("ORDERS_NATS_SUBJECT", "orders..x", "expected a NATS subject"),
        ("ORDERS_NATS_DURABLE", "x" * 65, "expected 1 to 64 letters"),
        ("ORDERS_LOG_FORMAT", "xml", "ORDERS_LOG_FORMAT='xml': expected one of text, json"),
        ("ORDERS_CONSUME", "maybe", "ORDERS_CONSUME='maybe': expected true or false"),
        ("ORDERS_EVENT_LOOP", "trio", "expected one of uvloop, asyncio"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + variable) as raised:
        Settings.from_env({variable: value})
    assert message in str(raised.value)


def test_blank_value_means_unset() -> None:
    assert Settings.from_env({"ORDERS_WEB_PORT": "  ", "ORDERS_NATS_URL": ""}) == Settings()


def test_redact_hides_only_the_password() -> None:
    assert redact("postgresql://app:s3cret@db:5432/orders") == "postgresql://app:***@db:5432/orders"
    assert redact("nats://nats:4222") == "nats://nats:4222"
    assert redact("nats://s3cret-token@nats:4222") == "nats://***@nats:4222"
