"""A fast SQL load of many events straight into ``orders_events`` for the read and replay figures
(orders to publish come from tests/orders.py, as the tests' do)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Final

import orjson
import psycopg2

from bench.servers import query
from publisher.generate import OrderFactory
from streams.store import EVENT_TYPE

LOAD_CHUNK: Final = 100_000

# Each row is the model order (two items, about 1 KB) with its identifiers made unique:
# order_uid and payment.transaction, the first item's rid and chrt_id, and payment_dt.
_LOAD: Final = """
INSERT INTO orders_events (order_uid, event_type, payload)
SELECT uid, %(event_type)s,
       jsonb_set(jsonb_set(jsonb_set(jsonb_set(jsonb_set(
           %(template)s::jsonb,
           '{order_uid}', to_jsonb(uid)),
           '{payment,transaction}', to_jsonb(uid)),
           '{payment,payment_dt}', to_jsonb(1700000000 + g)),
           '{items,0,rid}', to_jsonb(left(md5(uid), 20) || 'test')),
           '{items,0,chrt_id}', to_jsonb(1000000 + g %% 9000000))
  FROM (SELECT g, left(md5(%(salt)s || g::text), 24) || 'test' AS uid
          FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g) AS numbered
 ORDER BY g
"""


def model_order() -> dict[str, Any]:
    """A generated order with two items: the template of the SQL load."""
    factory = OrderFactory(seed=7)
    while True:
        order: dict[str, Any] = factory.order()
        items: list[Any] = order["items"]
        if len(items) == 2:
            return order


def load_events(dsn: str, count: int, *, salt: str = "bench") -> tuple[float, int]:
    """Insert ``count`` events with SQL alone, then VACUUM ANALYZE the table.

    Returns the seconds it took and the total size of the payloads as text in bytes.
    """
    template = orjson.dumps(model_order()).decode()
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    started = time.perf_counter()
    try:
        with conn.cursor() as cur:
            for first in range(1, count + 1, LOAD_CHUNK):
                last = min(count, first + LOAD_CHUNK - 1)
                cur.execute(
                    _LOAD,
                    {
                        "event_type": EVENT_TYPE,
                        "template": template,
                        "salt": salt,
                        "first": first,
                        "last": last,
                    },
                )
            # Hint bits and the visibility map set now, and the load's dirty pages written out,
            # so that no run pays for them (CHECKPOINT needs a privileged role: best effort).
            cur.execute("VACUUM (ANALYZE) orders_events")
            with contextlib.suppress(psycopg2.Error):
                cur.execute("CHECKPOINT")
            cur.execute("SELECT count(*), sum(octet_length(payload::text)) FROM orders_events")
            row = cur.fetchone()
    finally:
        conn.close()
    stored, payload_bytes = int(row[0]), int(row[1] or 0)
    if stored != count:
        raise RuntimeError(f"loaded {stored} events, expected {count}")
    return time.perf_counter() - started, payload_bytes


def uids(dsn: str) -> list[str]:
    """Every order_uid in the log, in seq order."""
    return [str(uid) for (uid,) in query(dsn, "SELECT order_uid FROM orders_events ORDER BY seq")]


def count_events(dsn: str) -> int:
    ((count,),) = query(dsn, "SELECT count(*) FROM orders_events")
    return int(count)


async def wait_for_pages(dsn: str, expected: int, timeout_s: float) -> float:
    """Seconds until ``orders_view_pages`` holds ``expected`` snapshot pages (a worker writes
    them after its restore); RuntimeError after ``timeout_s``."""
    started = time.perf_counter()
    while True:
        ((written,),) = await asyncio.to_thread(
            query, dsn, "SELECT count(*) FROM orders_view_pages"
        )
        if written >= expected:
            return time.perf_counter() - started
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"{written} snapshot pages of {expected} after {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


def drop_pages(dsn: str) -> None:
    """Remove the snapshot pages and their dictionary: the next start is a cold one, from the
    log alone, as the first start on an existing log is."""
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE orders_view_pages, orders_view_dictionary")
        conn.commit()
