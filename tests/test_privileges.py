"""The service needs no more than SELECT and INSERT on its two tables (least privilege)."""

from __future__ import annotations

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


def as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


@pytest.fixture
def app_role(database_url: str) -> Iterator[str]:
    """A login role that may SELECT and INSERT on the service's tables, and nothing more."""
    role = f"orders_app_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            cur.execute(
                sql.SQL("GRANT SELECT, INSERT ON orders_events, orders_dead_letters TO {}").format(
                    sql.Identifier(role)
                )
            )
            cur.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
        yield role
    finally:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        conn.close()


async def test_worker_runs_with_select_and_insert_only(
    tmp_path: Path, database_url: str, store: PostgresEventStore, app_role: str, route: Route
) -> None:
    """The schema is applied by its owner (here the store fixture); the worker, connected as
    a role with SELECT and INSERT only and told not to apply the schema, stores and serves."""
    batch = orders(50, seed=51)
    env = {**route.env(as_role(database_url, app_role)), "ORDERS_APPLY_SCHEMA": "false"}
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
    database_url: str, store: PostgresEventStore, app_role: str, statement: str
) -> None:
    conn = psycopg2.connect(as_role(database_url, app_role))
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
