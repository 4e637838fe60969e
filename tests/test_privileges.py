"""The service needs no more than SELECT and INSERT on its two tables (least privilege)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from psycopg2 import sql

from streams.store import PostgresEventStore, SchemaMissing
from tests.flow import Route, event_uids, orders, wait_for_orders
from tests.worker import Worker


def as_role(url: str, role: str, password: str) -> str:
    """The same server and database, logged in as ``role`` with ``password``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


@pytest.fixture
def app_role_url(database_url: str) -> Iterator[str]:
    """The URL of a login role that may SELECT and INSERT on the service's tables, and nothing
    more. It has a password of its own: servers that ask for one (scram-sha-256 over TCP, as
    PostgreSQL's Docker image and the compose file's postgres do) refuse a role without one.
    The password is hex, so it goes into the URL as it is."""
    role = f"orders_app_{uuid.uuid4().hex[:8]}"
    password = secrets.token_hex(16)
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
            cur.execute(
                sql.SQL("GRANT SELECT, INSERT ON orders_events, orders_dead_letters TO {}").format(
                    sql.Identifier(role)
                )
            )
            cur.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        yield as_role(database_url, role, password)
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        conn.close()


async def test_worker_runs_with_select_and_insert_only(
    tmp_path: Path, store: PostgresEventStore, app_role_url: str, route: Route
) -> None:
    """The schema is applied by its owner (here the store fixture); the worker, connected as
    a role with SELECT and INSERT only and told not to apply the schema, stores and serves."""
    batch = orders(50, seed=51)
    env = {**route.env(app_role_url), "ORDERS_APPLY_SCHEMA": "false"}
    with Worker(tmp_path, **env) as worker:
        await worker.wait_ready()
        await route.send([*batch, b"{oops"])
        await wait_for_orders(worker, 50)
    assert sorted(await event_uids(store)) == sorted(str(m.uid) for m in batch)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE orders_events SET event_type = 'x'",
        "DELETE FROM orders_events",
        "DELETE FROM orders_dead_letters",
        "TRUNCATE orders_events",
        "DROP TABLE orders_events",
        "CREATE TABLE sneaky (id int)",
    ],
)
def test_the_role_cannot_change_or_remove_history(
    store: PostgresEventStore, app_role_url: str, statement: str
) -> None:
    """Promise 2 (orders_events is append-only) holds in the database itself: the service's
    role may not update, delete, truncate or drop, whatever a bug in the code would try."""
    conn = psycopg2.connect(app_role_url)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute(statement)
    finally:
        conn.close()


async def test_missing_schema_without_rights_to_create_it_is_a_clear_error(
    database_url: str,
) -> None:
    with pytest.raises(SchemaMissing, match="table orders_events is missing"):
        await PostgresEventStore.open(database_url, apply_schema=False)
