"""A writer given libpq's list of hosts follows whichever one is writable, without a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from streams.agent import BatchProcessor
from streams.envelope import Outcome
from streams.follower import ViewFollower
from streams.store import PostgresEventStore, schema_sql
from tests.chaos_servers import OwnPostgres, own_postgres
from tests.orders import new_uid, order_bytes
from tests.test_agent import envelopes, outcomes, process
from views.view import OrdersView


def _server_of(url: str) -> tuple[str, str]:
    """The host (or socket directory) and port libpq reaches with ``url``."""
    conn = psycopg2.connect(url)
    try:
        return conn.info.host, str(conn.info.port)
    finally:
        conn.close()


def _log_uids(url: str) -> list[str]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT order_uid FROM orders_events ORDER BY seq")
            return [uid for (uid,) in cur.fetchall()]
    finally:
        conn.close()


@pytest.fixture
def second_server() -> Iterator[OwnPostgres]:
    """Another PostgreSQL server, as a standby about to be promoted would be."""
    with own_postgres() as server:
        yield server


async def test_a_writer_follows_the_host_that_becomes_the_writable_one(
    database_url: str, store: PostgresEventStore, second_server: OwnPostgres
) -> None:
    """Promise 1 across a failover: the first host of the list turns read-only (as a demoted
    primary does) and drops its connections; the other is writable with the same database.
    The worker's next batch is committed on the writable host and settled only then."""
    name = urlsplit(database_url).path.lstrip("/")
    other_url = second_server.create_database(name)
    setup = psycopg2.connect(other_url)
    setup.autocommit = True
    with setup.cursor() as cur:
        cur.execute(schema_sql())
    setup.close()
    first, second = _server_of(database_url), _server_of(other_url)
    params = parse_dsn(database_url)
    # One password for every host: the second server (pgserver's own) trusts local users
    # and ignores it; the first may ask for it (password auth).
    login = {"password": params["password"]} if params.get("password") else {}
    hosts = make_dsn(
        dbname=name,
        user=params.get("user", "postgres"),
        host=f"{first[0]},{second[0]}",
        port=f"{first[1]},{second[1]}",
        target_session_attrs="read-write",
        **login,
    )
    writer = await PostgresEventStore.open(hosts)
    try:
        processor = BatchProcessor(writer, ViewFollower(OrdersView(), writer, page_size=100))
        before = new_uid()
        await process(processor, envelopes(order_bytes(before)))
        assert _log_uids(database_url) == [before]

        admin = psycopg2.connect(database_url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                    sql.Identifier(name)
                )
            )
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        admin.close()

        after = new_uid()
        batch = envelopes(order_bytes(after))
        await asyncio.wait_for(process(processor, batch), timeout=60)
        assert outcomes(batch) == [Outcome.STORED]
        assert _log_uids(other_url) == [after], "committed on the writable host"
        assert _log_uids(database_url) == [before]
    finally:
        await writer.close()
