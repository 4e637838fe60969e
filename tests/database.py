"""The tests' look into the database: what the log holds, queries the service never makes, and
switching a database off and on, as an outage or a maintenance window would."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import psycopg2
from psycopg2 import sql

from streams.events import Event, EventStore
from streams.store import PostgresEventStore


class InspectedStore(PostgresEventStore):
    """The service's store, plus the ad hoc queries tests make and the service does not."""

    async def fetch(self, query: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """The rows of one read-only query."""
        async with self._cursor() as cur:
            await cur.execute(query, tuple(args))
            return list(await cur.fetchall())


async def logged_events(store: EventStore) -> list[Event]:
    """Every event in the log, in seq order, read as the view reads it."""
    async with contextlib.aclosing(store.read_pages(0, 10_000)) as pages:
        return [event async for page in pages for event in page]


class DatabaseSwitch:
    """Refuses new connections to one database and ends the open ones; allows them again."""

    def __init__(self, admin_url: str, database_url: str) -> None:
        self.name = urlsplit(database_url).path.lstrip("/")
        self._admin = psycopg2.connect(admin_url)
        self._admin.autocommit = True

    def refuse(self) -> None:
        """No new connections, and every open one ended (waits until they are gone)."""
        self._set_allowed(False)
        self.terminate("")

    def allow(self) -> None:
        """Connections welcome again."""
        self._set_allowed(True)

    def terminate(self, query_prefix: str) -> int:
        """End the backends of the database whose current query starts with ``query_prefix``
        (all of them for ""), and wait until they are gone; returns how many there were."""
        ended = 0
        with self._admin.cursor() as cur:
            # Termination is a signal: wait until the backends are really gone.
            for _ in range(200):
                cur.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = %s AND query LIKE %s AND pid <> pg_backend_pid()",
                    (self.name, query_prefix + "%"),
                )
                (count,) = cur.fetchone()
                if count == 0:
                    return ended
                ended = max(ended, count)
                time.sleep(0.05)
        raise AssertionError(f"backends of {self.name} did not go away")

    def close(self) -> None:
        self.allow()
        self._admin.close()

    def _set_allowed(self, allowed: bool) -> None:
        statement = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
            sql.Identifier(self.name), sql.Literal(allowed)
        )
        with self._admin.cursor() as cur:
            cur.execute(statement)
