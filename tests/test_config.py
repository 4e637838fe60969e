"""Settings come from the environment, checked at the edge; a bad value names its variable."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from publisher.config import ConfigError as PublisherConfigError
from publisher.config import resolve_url
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
            "ORDERS_WEB_DRIVER": "aiohttp",
            "ORDERS_DATA_DIR": "/var/lib/orders",
            "ORDERS_BATCH_SIZE": "250",
            "ORDERS_BATCH_MAX_WAIT_MS": "5",
            "ORDERS_REPLAY_PAGE_SIZE": "500",
            "ORDERS_NATS_STREAM": "S",
            "ORDERS_NATS_SUBJECT": "a.b.>",
            "ORDERS_NATS_DURABLE": "d",
            "ORDERS_NATS_ACK_WAIT_S": "12.5",
            "ORDERS_NATS_MAX_ACK_PENDING": "77",
            "ORDERS_NATS_REPLICAS": "3",
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
        web_driver="aiohttp",
        data_dir=Path("/var/lib/orders"),
        batch_size=250,
        batch_max_wait_ms=5,
        replay_page_size=500,
        nats_stream="S",
        nats_subject="a.b.>",
        nats_durable="d",
        nats_ack_wait_s=12.5,
        nats_max_ack_pending=77,
        nats_replicas=3,
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
        ("ORDERS_NATS_URL", "nats://h:x", "the port is not a number"),
        ("ORDERS_NATS_SUBJECT", "orders..x", "expected a NATS subject"),
        ("ORDERS_NATS_DURABLE", "x" * 65, "expected 1 to 64 letters"),
        ("ORDERS_LOG_FORMAT", "xml", "ORDERS_LOG_FORMAT='xml': expected one of text, json"),
        ("ORDERS_CONSUME", "maybe", "ORDERS_CONSUME='maybe': expected true or false"),
        ("ORDERS_EVENT_LOOP", "trio", "expected one of uvloop, asyncio"),
        ("ORDERS_WEB_DRIVER", "h2o", "expected one of fast, aiohttp"),
        ("ORDERS_NATS_REPLICAS", "7", "ORDERS_NATS_REPLICAS=7: expected a number from 1 to 5"),
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


# Each case: a value of ORDERS_DATABASE_URL or ORDERS_NATS_URL, and the secrets in it (a
# percent-encoded one also decoded), in every form libpq or NATS clients take.
SECRET_CASES = [
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7s3cret@db:5432/orders", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "postgres://orders:Zq7s3cret@db/orders", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders@db/orders?password=Zq7s3cret", ["Zq7s3cret"]),
    (
        "ORDERS_DATABASE_URL",
        "postgresql://orders@db/orders?sslmode=require&sslpassword=Zq7s3cret",
        ["Zq7s3cret"],
    ),
    ("ORDERS_DATABASE_URL", "postgresql://orders@db/orders?pass%77ord=Zq7s3cret", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders@db/orders?passwrd=Zq7s3cret", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7%40s3cret@db/orders", ["Zq7%40s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7%zzs3cret@db/orders", ["Zq7%zzs3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7@s3cret@db/orders", ["Zq7", "s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7/s3cret@db/orders", ["Zq7", "s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7?s3cret@db/orders", ["Zq7", "s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders@db/orders?password=Zq7@s3cret", ["Zq7", "s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7s3cret@[::1]:5432/orders", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7s3cret@[::1/orders", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7s3cret@db:abc/orders", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7s3cret@db:99999/orders", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7s3cret/orders", ["Zq7s3cret"]),
    (
        "ORDERS_DATABASE_URL",
        "postgresql://orders:Zq7s3cret@h1:5432,h2:5432/orders?target_session_attrs=read-write",
        ["Zq7s3cret"],
    ),
    ("ORDERS_DATABASE_URL", "postgresql://orders:Zq7s3cret@h1:5432,h2:x/orders", ["Zq7s3cret"]),
    (
        "ORDERS_DATABASE_URL",
        "postgresql://orders@h1,h2/orders?password=Zq7s3cret&target_session_attrs=read-write",
        ["Zq7s3cret"],
    ),
    ("ORDERS_DATABASE_URL", "postgresql:///orders?host=/run/pg&password=Zq7s3cret", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "mysql://orders:Zq7s3cret@db/orders", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "host=db user=orders password=Zq7s3cret dbname=orders", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "host=db password = Zq7s3cret", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "host=db password='Zq7 s3cret' dbname=orders", ["Zq7", "s3cret"]),
    ("ORDERS_DATABASE_URL", r"host=db password='Zq7\' s3cret'", ["Zq7", "s3cret"]),
    ("ORDERS_DATABASE_URL", "host=db password='Zq7 s3cret", ["Zq7", "s3cret"]),
    ("ORDERS_DATABASE_URL", "host=db sslpassword=Zq7s3cret", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "host=db Zq7s3cret", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "host=db passwrd=Zq7s3cret", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "host=h1,h2 port=5432,x password=Zq7s3cret", ["Zq7s3cret"]),
    ("ORDERS_DATABASE_URL", "dbname='postgresql://orders:Zq7s3cret@db/orders'", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7s3cret@nats:4222", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://Zq7s3cret@nats:4222", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://Zq7s3cret@a:4222,nats://b:4222", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://a:4222, tls://orders:Zq7s3cret@b:4222", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://a:4222,Zq7s3cret@b:4222", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7s3cret@a:abc", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7s3cret@a:4222,nats://b:99999", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7s3cret@[::1", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7s3cret@[::1]:4222", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7%2Cs3cret@a:4222", ["Zq7%2Cs3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7,s3cret@a:4222", ["Zq7", "s3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7/s3cret@a:4222", ["Zq7", "s3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7s3cret@a:4222,ws://b:80", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "nats://orders:Zq7s3cret", ["Zq7s3cret"]),
    ("ORDERS_NATS_URL", "http://orders:Zq7s3cret@a", ["Zq7s3cret"]),
]


@pytest.mark.parametrize(("variable", "value", "secrets"), SECRET_CASES)
def test_no_secret_reaches_a_log_or_an_error(variable: str, value: str, secrets: list[str]) -> None:
    """No password or token is ever logged or quoted in a configuration error, whatever the
    form of the URL and however malformed it is."""
    secrets = [*secrets, *(unquote(secret) for secret in secrets)]
    shown = [redact(value)]
    try:
        Settings.from_env({variable: value})
    except ConfigError as error:
        shown.append(str(error))
    if variable == "ORDERS_NATS_URL":
        try:
            resolve_url(value, {})
        except PublisherConfigError as error:
            shown.append(str(error))
    for text in shown:
        for secret in secrets:
            assert secret not in text


def test_redact_hides_the_password_and_shows_the_user() -> None:
    """What is hidden is the secret only: the user, hosts, ports and database stay readable."""
    assert (
        redact("postgresql://orders@db/orders?password=s3cret&sslmode=require")
        == "postgresql://orders@db/orders?password=***&sslmode=require"
    )
    assert (
        redact("host=db user=orders password='s 3' dbname=orders")
        == "host=db user=orders password=*** dbname=orders"
    )
    assert redact("nats://orders:s3cret@a:4222,nats://tok@b:4222") == (
        "nats://orders:***@a:4222,nats://***@b:4222"
    )
    assert redact(["nats://tok@a:4222", "nats://orders:s3cret@b:4222"]) == (
        "nats://***@a:4222,nats://orders:***@b:4222"
    )


def test_a_nats_seed_list_is_accepted_and_split_once() -> None:
    """ORDERS_NATS_URL takes the comma-separated list every NATS client takes."""
    settings = Settings.from_env(
        {"ORDERS_NATS_URL": "nats://a:4222, nats://u:p@b:4222 ,tls://[::1]:4222"}
    )
    assert settings.nats_servers == ["nats://a:4222", "nats://u:p@b:4222", "tls://[::1]:4222"]
    assert Settings.from_env({"ORDERS_NATS_URL": "nats://a:4222"}).nats_servers == ["nats://a:4222"]
    assert Settings().nats_servers == []
    assert resolve_url("nats://a:4222,nats://b:4222", {}).servers == [
        "nats://a:4222",
        "nats://b:4222",
    ]


@pytest.mark.parametrize(
    "value",
    [
        "postgresql://orders@h1:5432,h2:5432/orders?target_session_attrs=read-write",
        "postgresql://orders@h1,h2,[::1]:5433/orders",
        "postgresql:///orders?host=/run/postgresql",
        "host=h1,h2 port=5432,5433 user=orders password='s 3' dbname=orders",
    ],
)
def test_libpq_multi_host_and_keyword_forms_are_accepted(value: str) -> None:
    """libpq's multi-host URI and its key=value form go to libpq as they are."""
    assert Settings.from_env({"ORDERS_DATABASE_URL": value}).database_url == value


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ORDERS_NATS_URL", "nats://a:4222,nats://b:x", "server 2 of 2: the port is not"),
        ("ORDERS_NATS_URL", "nats://a:4222,nats://b:70000", "server 2 of 2: the port is not"),
        ("ORDERS_NATS_URL", "nats://a:4222,http://b:4222", "server 2 of 2: expected a URL"),
        ("ORDERS_NATS_URL", "nats://a:4222,b:4222", "server 2 of 2: expected a URL"),
        ("ORDERS_NATS_URL", "nats://a:4222,,nats://b:4222", "server 2 of 3: empty"),
        ("ORDERS_NATS_URL", "nats://a:4222,ws://b:80", "mixes websocket"),
        ("ORDERS_NATS_URL", "nats://[::1", "malformed: an IPv6 address needs its closing"),
        ("ORDERS_NATS_URL", "nats://:4222", "no host"),
        ("ORDERS_NATS_URL", "NATS://a:4222", "expected a URL starting with nats://"),
        ("ORDERS_NATS_URL", "nats://a:4222,nats://b c:4222", "server 2 of 2: a space inside"),
        ("ORDERS_DATABASE_URL", "postgresql://u@h1:5432,h2:x/db", "host 2 of 2: the port is not"),
        ("ORDERS_DATABASE_URL", "postgresql://u:p@[::1/db", "libpq cannot read it"),
        ("ORDERS_DATABASE_URL", "host=h1,h2,h3 port=1,2", "3 hosts but 2 ports"),
        ("ORDERS_DATABASE_URL", "host=db port=x", "the port is not a number"),
    ],
)
def test_a_bad_entry_of_a_list_is_named(variable: str, value: str, message: str) -> None:
    """Every server of a list is checked, and the error says which one is wrong."""
    with pytest.raises(ConfigError, match="^" + variable) as raised:
        Settings.from_env({variable: value})
    assert message in str(raised.value)
