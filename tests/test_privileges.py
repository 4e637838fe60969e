"""The service needs no more than SELECT and INSERT on the log and the dead letters, and, for
snapshot pages, SELECT, INSERT and DELETE on the pages (least privilege)."""

from __future__ import annotations

from pathlib import Path

import psycopg2
import pytest

from streams.follower import ViewFollower
from streams.store import AccessDenied, PostgresEventStore, SchemaMissing
from streams.validation import Accepted
from tests.database import InspectedStore
from tests.flow import event_uids, wait_for_orders
from tests.harness import Route
from tests.orders import new_uid, order_bytes, orders
from tests.worker import Worker
from views.view import OrdersView


async def test_worker_runs_with_select_and_insert_only(
    tmp_path: Path, store: InspectedStore, app_role_url: str, route: Route
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
    store: InspectedStore, app_role_url: str, statement: str
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


async def test_a_read_replica_with_select_only_boots_from_snapshot_pages(
    store: InspectedStore, app_role_url: str, database_url: str
) -> None:
    """Pages written by a writer; a reader whose role may only SELECT (as on a hot standby)
    takes them in, and may not write or drop any."""
    for _batch in range(3):
        chunk = [new_uid() for _ in range(10)]
        await store.write_batch([Accepted(uid, order_bytes(uid)) for uid in chunk], [])
    writer = ViewFollower(
        OrdersView(train_after=10), store, 16, snapshots=store, snapshot_page_orders=10
    )
    await writer.boot()
    while await writer.write_snapshot_page():
        pass
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    role = app_role_url.split("//")[1].split(":")[0]
    with conn.cursor() as cur:
        cur.execute(f'GRANT SELECT ON orders_view_pages, orders_view_dictionary TO "{role}"')
    conn.close()
    reader = await PostgresEventStore.open(app_role_url, apply_schema=False, writer=False)
    try:
        assert reader.snapshot_reads and not reader.snapshot_writes
        replica = ViewFollower(OrdersView(), reader, 16, snapshots=reader)
        stats = await replica.boot()
        assert stats.events == 30 and set(replica.view) == set(writer.view)
        assert not await replica.write_snapshot_page()
        with pytest.raises(AccessDenied):
            await reader.drop_pages(0)
    finally:
        await reader.close()
