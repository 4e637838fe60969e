"""The event store: the orders event log and the dead letters in PostgreSQL, through aiopg.

aiopg has no executemany, COPY or server-side cursors, so every batch is one statement over
arrays (``unnest``), and replay reads keyset pages (``seq > last ORDER BY seq LIMIT n``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.resources
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Final, Self

import aiopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions

from streams.config import POOL_SIZE

# What both stores share lives in streams.events; it is re-exported here (the "as" form), so
# that the callers of this module import it from here as before.
from streams.events import AccessDenied as AccessDenied
from streams.events import BatchResult as BatchResult
from streams.events import DeadLetter as DeadLetter
from streams.events import Event as Event
from streams.events import EventStore as EventStore
from streams.events import Listener as Listener
from streams.events import RefusedByDatabase as RefusedByDatabase
from streams.events import StatementTimedOut as StatementTimedOut
from streams.events import StoreUnavailable as StoreUnavailable
from streams.pg_hosts import is_multi_host, pin_host
from streams.snapshots import SnapshotPage
from streams.validation import Accepted

EVENT_TYPE: Final = "OrderPlaced"


class SchemaError(Exception):
    """The schema is not one the service can run on; the message says what to do."""


class SchemaMissing(SchemaError):
    """The tables are not there, and the service was told not to create them."""


class SchemaUnsafe(SchemaError):
    """The tables are there, but set up in a way that would break the log's promises."""


# Writers take this lock until commit; readers never wait for it. Without it two
# transactions could take seq 7 and 8, 8 could commit first, and a reader tailing the log
# (seq > last) could pass 7 before it becomes visible and never see it. An advisory lock
# rather than LOCK TABLE ... IN EXCLUSIVE MODE, because that mode needs UPDATE or DELETE
# rights on the table, which the service's role does not have.
#
# Every transaction is READ COMMITTED whatever the server's or the role's default: under
# REPEATABLE READ or SERIALIZABLE the snapshot would be taken by the statement that waits for
# the lock, before the lock is granted, and the head read after it would miss rows committed
# meanwhile.
APPEND_LOCK_KEY: Final = 0x0DE26
APPEND_SQL: Final = f"""
SELECT pg_advisory_xact_lock({APPEND_LOCK_KEY});
INSERT INTO orders_events (order_uid, event_type, payload)
SELECT uid, %s, payload::jsonb
  FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS batch(uid, payload, position)
 ORDER BY position
    ON CONFLICT (order_uid) DO NOTHING
RETURNING seq, order_uid, (SELECT max(seq) FROM orders_events)
"""
# The subquery in RETURNING sees the statement's snapshot, taken after the lock: the log's
# head just before this insert, with every row another writer committed before it.

# Seqs come from the identity sequence in the order the lock hands out, but only if each
# nextval() takes the next number: with CACHE > 1 every connection takes a range of its own,
# and a later commit can carry a smaller seq than one a reader has already passed.
_SEQUENCE: Final = """
SELECT seqcache, seqincrement FROM pg_sequence
 WHERE seqrelid = pg_get_serial_sequence('orders_events', 'seq')::regclass
"""

NOTIFY_CHANNEL: Final = "orders_events"
NOTIFY_SQL: Final = "SELECT pg_notify(%s, %s)"
_HEAD: Final = "SELECT coalesce(max(seq), 0) FROM orders_events"

_CONFLICTS: Final = """
SELECT DISTINCT e.order_uid
  FROM unnest(%s::text[], %s::text[]) AS dup(uid, payload)
  JOIN orders_events e ON e.order_uid = dup.uid
 WHERE e.payload <> dup.payload::jsonb
"""

# A redelivery (same source, same bytes) is kept once; another message under a source seen
# before (a stream recreated, its sequences started again) is kept beside it.
_DEAD_LETTER: Final = """
INSERT INTO orders_dead_letters (raw, reason, source)
SELECT raw, reason, source
  FROM unnest(%s::bytea[], %s::text[], %s::text[]) AS letter(raw, reason, source)
    ON CONFLICT (source, sha256(raw)) DO NOTHING
"""

READ_SQL: Final = """
SELECT seq, order_uid, payload::text FROM orders_events WHERE seq > %s ORDER BY seq LIMIT %s
"""

# Snapshot pages (streams/snapshots.py): what a role needs to read them, and to write them (a
# writer also drops pages that disagree with the log; the log itself it may never change).
_SNAPSHOT_READS: Final[dict[str, tuple[str, ...]]] = {
    "orders_view_pages": ("SELECT",),
    "orders_view_dictionary": ("SELECT",),
}
_SNAPSHOT_WRITES: Final[dict[str, tuple[str, ...]]] = {
    "orders_view_pages": ("INSERT", "DELETE"),
    "orders_view_dictionary": ("INSERT",),
}
_PAGE_SQL: Final = """
SELECT after_seq, last_seq, orders, dictionary_sha256, body, body_sha256
  FROM orders_view_pages WHERE after_seq >= %s ORDER BY after_seq LIMIT 1
"""
_PAGE_LOG_COUNT: Final = "SELECT count(*) FROM orders_events WHERE seq > %s AND seq <= %s"
_PAGE_LOG_SAMPLES: Final = """
SELECT seq, order_uid, payload::text FROM orders_events WHERE seq = ANY(%s::bigint[])
"""
_WRITE_PAGE: Final = """
INSERT INTO orders_view_pages
       (after_seq, last_seq, orders, dictionary_sha256, body, body_sha256, written_by)
VALUES (%s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (after_seq) DO NOTHING
"""

_SCHEMA_LOCK_KEY: Final = 0x0DE25  # any constant shared by every worker applying the schema

# The client waits this much longer than the server's statement timeout, so that the server
# ends a slow statement (releasing the append lock) before the client gives up on it; a
# client that gave up first would leave its backend running, lock held, for nobody.
_CLIENT_MARGIN_S: Final = 5.0
# With a list of hosts, how soon after choosing one the store may choose again.
_CHOOSE_AGAIN_S: Final = 2.0


def schema_sql() -> str:
    """The schema the service applies at start (the same file as ``init-db/01-schema.sql``)."""
    return importlib.resources.files("streams").joinpath("schema.sql").read_text("utf-8")


class PostgresEventStore:
    """The event store on PostgreSQL: per batch, one transaction and one statement per table."""

    def __init__(
        self,
        *,
        apply_schema: bool = True,
        writer: bool = True,
        maxsize: int = POOL_SIZE,
        timeout: float = 10.0,
    ) -> None:
        """A store not yet connected: :meth:`connect` opens it.

        ``timeout`` bounds each statement of a write on the server (and connecting). A store
        that is no ``writer`` (a read replica) never applies the schema and needs SELECT only;
        a writer with ``apply_schema=False`` checks that the schema is there."""
        self._apply_schema = apply_schema
        self._writer = writer
        self._maxsize = maxsize
        self._timeout = timeout
        self._pool: aiopg.Pool | None = None
        self._dsn = ""  # the one host aiopg connects to
        # As configured: a list of hosts is chosen from again when the chosen one fails.
        self._configured_dsn = ""
        self._moving: asyncio.Task[None] | None = None
        self._moved_at = 0.0
        # Names this store's commits in its notifications ("<seq> <writer>"), so that its own
        # follower can leave them to the agent, which projects them without reading them back.
        self.writer_id = uuid.uuid4().hex[:12]
        # Whether this role may read and write snapshot pages (found out at connect): without,
        # the view is restored from the log alone, as before there were pages.
        self.snapshot_reads = False
        self.snapshot_writes = False

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        apply_schema: bool = True,
        writer: bool = True,
        maxsize: int = POOL_SIZE,
        timeout: float = 10.0,
    ) -> Self:
        """A store connected to ``dsn`` (see :meth:`connect`)."""
        store = cls(apply_schema=apply_schema, writer=writer, maxsize=maxsize, timeout=timeout)
        await store.connect(dsn)
        return store

    async def connect(self, dsn: str, *, reader: bool = False) -> None:
        """Connect, apply the schema (or check that it is there), and check what the log's
        order rests on. ``reader`` opens a writer's store as a reader, for a command that only
        reads. Raises StoreUnavailable, or a SchemaError; on failure nothing stays open."""
        try:
            pinned = await asyncio.to_thread(pin_host, dsn, self._timeout)  # aiopg: one host
            pool = await _create_pool(pinned, self._maxsize, self._timeout)
        except (psycopg2.Error, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}".strip()) from exc
        self._pool, self._dsn, self._configured_dsn = pool, pinned, dsn
        writer = self._writer and not reader
        try:
            if self._apply_schema and writer:
                await self.apply_schema()
            else:
                await self.check_schema(writer=writer)
            await self.check_sequence()
            await self._find_snapshot_rights(writer)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close every connection of the pool (nothing to do when not connected)."""
        if self._moving is not None:
            self._moving.cancel()
            await asyncio.gather(self._moving, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            await pool.wait_closed()

    def _connection_failed(self) -> None:
        """A connection to the chosen host failed: with a list of hosts, have libpq choose
        again (at most every few seconds), so that a writer follows a promoted standby and a
        reader the host that answers, without a restart."""
        loop = asyncio.get_running_loop()
        if (
            self._moving is not None
            or loop.time() - self._moved_at < _CHOOSE_AGAIN_S
            or not is_multi_host(self._configured_dsn)
        ):
            return
        self._moved_at = loop.time()
        self._moving = loop.create_task(self._choose_host_again(), name="choose-database-host")

    async def _choose_host_again(self) -> None:
        try:
            try:
                pinned = await asyncio.to_thread(pin_host, self._configured_dsn, self._timeout)
                if pinned == self._dsn:
                    return
                pool = await _create_pool(pinned, self._maxsize, self._timeout)
            except (psycopg2.Error, OSError, TimeoutError, StoreUnavailable):
                return  # no host answers yet: the next failure tries again
            old, self._pool, self._dsn = self._pool, pool, pinned
            # Connections in use go back to the old pool, which closes them as they come.
            if old is not None:
                old.close()
                await old.wait_closed()
        finally:
            self._moving = None

    async def check_schema(self, *, writer: bool = True) -> None:
        """Fail clearly when the tables are missing or out of reach of this role: a writer
        needs SELECT and INSERT on the log and INSERT on the dead letters, a reader SELECT on
        the log."""
        needs = (
            {"orders_events": ("SELECT", "INSERT"), "orders_dead_letters": ("INSERT",)}
            if writer
            else {"orders_events": ("SELECT",)}
        )
        for table, wanted in needs.items():
            async with self._cursor() as cur:
                await cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
                (exists,) = await cur.fetchone()
                if not exists:
                    raise SchemaMissing(
                        f"table {table} is missing: apply init-db/*.sql as its owner,"
                        " or set ORDERS_APPLY_SCHEMA=true"
                    )
                # One privilege a call: has_table_privilege(t, 'SELECT, INSERT') is true
                # when either is held.
                await cur.execute(
                    "SELECT ARRAY["
                    + ", ".join(["has_table_privilege(%s, %s)"] * len(wanted))
                    + "]",
                    tuple(arg for privilege in wanted for arg in (table, privilege)),
                )
                (held,) = await cur.fetchone()
            lacking = [privilege for privilege, has in zip(wanted, held, strict=True) if not has]
            if lacking:
                raise SchemaMissing(
                    f"this role may not {' or '.join(lacking)} on table {table}:"
                    f" GRANT {', '.join(lacking)} ON {table} TO the service's role"
                )

    async def _find_snapshot_rights(self, writer: bool) -> None:
        self.snapshot_reads = await self._holds(_SNAPSHOT_READS)
        self.snapshot_writes = (
            writer and self.snapshot_reads and await self._holds(_SNAPSHOT_WRITES)
        )

    async def _holds(self, needs: dict[str, tuple[str, ...]]) -> bool:
        """Whether the tables exist and this role holds every privilege of ``needs`` on them."""
        async with self._cursor() as cur:
            for table, wanted in needs.items():
                await cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
                (exists,) = await cur.fetchone()
                if not exists:
                    return False
                await cur.execute(
                    "SELECT " + " AND ".join(["has_table_privilege(%s, %s)"] * len(wanted)),
                    tuple(arg for privilege in wanted for arg in (table, privilege)),
                )
                (held,) = await cur.fetchone()
                if not held:
                    return False
        return True

    async def check_sequence(self) -> None:
        """Refuse a seq sequence that hands out numbers out of commit order."""
        async with self._cursor() as cur:
            await cur.execute(_SEQUENCE)
            row = await cur.fetchone()
        if row is None:
            raise SchemaUnsafe("orders_events.seq has no identity sequence: apply init-db/*.sql")
        cache, increment = row
        if cache != 1 or increment != 1:
            raise SchemaUnsafe(
                f"the sequence of orders_events.seq has CACHE {cache} INCREMENT {increment};"
                " seqs would not follow commit order and views would skip orders. Run"
                " ALTER TABLE orders_events ALTER COLUMN seq SET CACHE 1 SET INCREMENT 1"
            )

    async def apply_schema(self) -> None:
        """Create the tables if missing; safe when several workers start at once."""
        sql = schema_sql()
        async with self._transaction() as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            await cur.execute(sql)

    async def write_batch(
        self, orders: Sequence[Accepted], rejects: Sequence[DeadLetter]
    ) -> BatchResult:
        """Append the orders and dead-letter the rejects in one transaction.

        An order_uid already in the log (or earlier in the batch) is a duplicate: the first
        write wins. A duplicate whose payload differs from the stored one is also a conflict.
        """
        stored: list[Event] = []
        duplicates: list[Accepted] = []
        conflicts: list[str] = []
        previous_seq = 0
        async with self._transaction() as cur:
            if orders:
                uids = [order.order_uid for order in orders]
                texts = [order.payload.decode() for order in orders]
                await cur.execute(APPEND_SQL, (EVENT_TYPE, uids, texts))
                new_seqs: dict[str, int] = {}
                for seq, uid, previous in await cur.fetchall():
                    new_seqs[uid] = seq
                    previous_seq = previous or 0
                for order in orders:
                    seq = new_seqs.pop(order.order_uid, None)
                    if seq is None:
                        duplicates.append(order)
                    else:
                        stored.append(Event(seq, order.order_uid, order.payload))
                stored.sort(key=_by_seq)
            if stored:
                # Delivered on commit; followers then read the tail of the log.
                notice = commit_notice(stored[-1].seq, self.writer_id)
                await cur.execute(NOTIFY_SQL, (NOTIFY_CHANNEL, notice))
            if duplicates:
                await cur.execute(
                    _CONFLICTS,
                    (
                        [order.order_uid for order in duplicates],
                        [order.payload.decode() for order in duplicates],
                    ),
                )
                conflicts = [uid for (uid,) in await cur.fetchall()]
            if rejects:
                await cur.execute(
                    _DEAD_LETTER,
                    (
                        [psycopg2.Binary(reject.raw) for reject in rejects],
                        [reject.reason for reject in rejects],
                        [reject.source for reject in rejects],
                    ),
                )
        return BatchResult(
            stored=stored,
            duplicates=[order.order_uid for order in duplicates],
            conflicts=conflicts,
            dead_lettered=list(rejects),
            previous_seq=previous_seq,
        )

    async def read_pages(self, after: int, page_size: int) -> AsyncGenerator[list[Event], None]:
        """Every event with ``seq > after`` to the end of the log, in seq order, in pages of
        up to ``page_size``.

        Two connections take turns: as soon as one page is in, the next is asked for on the
        other, and only then are this page's rows turned into Python objects, so PostgreSQL
        reads and sends the next page meanwhile. (One connection cannot do it: psycopg2
        refuses to fetch while a query of the same connection is under way.) Each page is a
        query of its own either way; the append lock keeps every snapshot a prefix of the log.
        """
        async with self._cursor() as current, self._cursor() as spare:
            _text_as_bytes(current)
            _text_as_bytes(spare)
            await current.execute(READ_SQL, (after, page_size))
            while count := current.rowcount:
                asking: asyncio.Future[None] | None = None
                if count == page_size:
                    await current.scroll(count - 1, mode="absolute")
                    (last_seq, _, _) = await current.fetchone()
                    await current.scroll(0, mode="absolute")
                    asking = asyncio.ensure_future(spare.execute(READ_SQL, (last_seq, page_size)))
                    await asyncio.sleep(0)  # the query goes out on the task's first step
                try:
                    yield _events(await current.fetchall())
                except BaseException:
                    if asking is not None:
                        asking.cancel()
                        with contextlib.suppress(BaseException):
                            await asking
                    raise
                if asking is None:
                    return
                await asking
                current, spare = spare, current

    async def read_dictionary(self) -> bytes | None:
        """The snapshot pages' dictionary, if one was published and is whole."""
        async with self._cursor() as cur:
            await cur.execute("SELECT dictionary, sha256 FROM orders_view_dictionary")
            row = await cur.fetchone()
        if row is None:
            return None
        dictionary = bytes(row[0])
        if hashlib.sha256(dictionary).digest() != bytes(row[1]):
            return None  # not whole: every page made with it will be refused
        return dictionary

    async def publish_dictionary(self, dictionary: bytes) -> bytes:
        """Make ``dictionary`` the pages' one unless another is there first; the one that is."""
        digest = hashlib.sha256(dictionary).digest()
        async with self._transaction() as cur:
            await cur.execute(
                "INSERT INTO orders_view_dictionary (dictionary, sha256) VALUES (%s, %s)"
                " ON CONFLICT (id) DO NOTHING",
                (psycopg2.Binary(dictionary), psycopg2.Binary(digest)),
            )
            await cur.execute("SELECT dictionary FROM orders_view_dictionary")
            (shared,) = await cur.fetchone()
        return bytes(shared)

    async def snapshot_pages(self) -> AsyncGenerator[SnapshotPage, None]:
        """The pages that follow one another from seq 0, in seq order, until one is missing.

        As in :meth:`read_pages`, the next page is asked for on a second connection before
        this one is handed over."""
        async with self._cursor() as current, self._cursor() as spare:
            await current.execute(_PAGE_SQL, (0,))
            row = await current.fetchone()
            while row is not None:
                page = SnapshotPage(
                    after_seq=int(row[0]),
                    last_seq=int(row[1]),
                    orders=int(row[2]),
                    dictionary_sha256=bytes(row[3]),
                    body=bytes(row[4]),
                    body_sha256=bytes(row[5]),
                )
                del row
                asking = asyncio.ensure_future(spare.execute(_PAGE_SQL, (page.last_seq,)))
                await asyncio.sleep(0)  # the query goes out on the task's first step
                try:
                    yield page
                except BaseException:
                    asking.cancel()
                    with contextlib.suppress(BaseException):
                        await asking
                    raise
                await asking
                current, spare = spare, current
                row = await current.fetchone()
                if row is not None and int(row[0]) != page.last_seq:
                    return  # the next page does not follow this one

    async def log_agreement(
        self, after_seq: int, last_seq: int, seqs: Sequence[int]
    ) -> tuple[int, dict[int, tuple[str, bytes]]]:
        """How many events the log holds in ``after_seq < seq <= last_seq``, and the uid and
        payload of its events at ``seqs``."""
        async with self._cursor() as cur:
            _text_as_bytes(cur)
            await cur.execute(_PAGE_LOG_COUNT, (after_seq, last_seq))
            (count,) = await cur.fetchone()
            await cur.execute(_PAGE_LOG_SAMPLES, (list(seqs),))
            rows = await cur.fetchall()
        return int(count), {int(seq): (uid.decode(), payload) for seq, uid, payload in rows}

    async def write_page(self, page: SnapshotPage) -> bool:
        """Insert a page unless one for its range is there; whether it was inserted."""
        async with self._transaction() as cur:
            await cur.execute(
                _WRITE_PAGE,
                (
                    page.after_seq,
                    page.last_seq,
                    page.orders,
                    psycopg2.Binary(page.dictionary_sha256),
                    psycopg2.Binary(page.body),
                    psycopg2.Binary(page.body_sha256),
                    self.writer_id,
                ),
            )
            return bool(cur.rowcount == 1)

    async def drop_pages(self, from_after_seq: int) -> int:
        """Delete the page starting at ``from_after_seq`` and every later one; how many."""
        async with self._transaction() as cur:
            await cur.execute(
                "DELETE FROM orders_view_pages WHERE after_seq >= %s", (from_after_seq,)
            )
            return int(cur.rowcount)

    async def head(self) -> int:
        """The last seq in the log (0 when it is empty)."""
        async with self._cursor() as cur:
            await cur.execute(_HEAD)
            row = await cur.fetchone()
            return int(row[0])

    async def listen(self) -> Listener:
        """A connection of its own that hears each commit of new events."""
        self._connected_pool()  # not connected: StoreUnavailable, like a database away
        try:
            conn = await aiopg.connect(
                self._dsn, enable_json=False, enable_hstore=False, enable_uuid=False
            )
        except (psycopg2.Error, OSError, TimeoutError, RuntimeError) as exc:
            translated = _translate(_connect_failure(exc))
            if isinstance(translated, StoreUnavailable):
                self._connection_failed()
            raise translated from exc
        listener = PostgresListener(conn, self.writer_id)
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except BaseException as exc:
            await listener.close()
            raise _translate(exc) from exc
        return listener

    def _cursor(self) -> _Cursor:
        return _Cursor(self._connected_pool(), None, self._connection_failed)

    def _transaction(self) -> _Cursor:
        return _Cursor(self._connected_pool(), self._timeout, self._connection_failed)

    def _connected_pool(self) -> aiopg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the event store is not connected")
        return self._pool


class PostgresListener:
    """Wake-ups from a LISTEN connection when another writer commits.

    A notification says only that something may have changed: any role that can connect may
    NOTIFY the channel, so the follower takes the head from the log, never from a payload.
    """

    def __init__(self, conn: aiopg.Connection, own_writer: str) -> None:
        self._conn = conn
        self._own_writer = own_writer

    @property
    def backlog(self) -> int:
        """Notifications received and not yet read."""
        return int(self._conn.notifies.qsize())

    async def wait(self, timeout: float) -> bool:
        """Whether another writer's commit was announced within ``timeout``. Every
        notification queued so far is read at once, so they never pile up; this store's own
        commits are left out (its agent projects them).

        Raises StoreUnavailable when the connection is lost.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        queue = self._conn.notifies
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                notices = [await asyncio.wait_for(queue.get(), max(remaining, 0))]
                while not queue.empty():
                    notices.append(queue.get_nowait())
            except TimeoutError:
                if self._conn.closed:
                    raise StoreUnavailable("the LISTEN connection is closed") from None
                return False
            except (psycopg2.Error, OSError) as exc:
                raise _translate(exc) from exc
            if any(_writer(notice.payload) != self._own_writer for notice in notices):
                return True

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()


def commit_notice(last_seq: int, writer_id: str) -> str:
    """The payload of the notification a commit sends on NOTIFY_CHANNEL: "<seq> <writer>"; the
    seq is for people reading the traffic, the writer lets a store leave out its own."""
    return f"{last_seq} {writer_id}"


def _writer(payload: str) -> str:
    # The writer of a commit_notice payload.
    return payload.rpartition(" ")[2]


def _text_as_bytes(cur: aiopg.Cursor) -> None:
    # Payloads arrive as the bytes the view serves, not as str to be encoded again; the
    # cursor alone is changed, not the pooled connection.
    psycopg2.extensions.register_type(psycopg2.extensions.BYTES, cur.raw)


def _events(rows: Sequence[tuple[int, bytes, bytes]]) -> list[Event]:
    return [Event(seq, uid.decode(), payload) for seq, uid, payload in rows]


def _by_seq(event: Event) -> int:
    return event.seq


class _Cursor:
    """A pooled cursor, optionally inside a transaction, that turns driver errors into ours.

    A transaction ends in a COMMIT that PostgreSQL confirmed, or in an exception: aiopg marks
    a cursor closed, without raising, when its connection drops, so a block that ran to its
    end has not necessarily committed anything.
    """

    def __init__(
        self,
        pool: aiopg.Pool,
        statement_timeout: float | None,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._statement_timeout = statement_timeout  # None: no transaction
        self._on_failure = on_failure
        self._conn: aiopg.Connection | None = None
        self._cur: aiopg.Cursor | None = None

    async def __aenter__(self) -> aiopg.Cursor:
        try:
            self._conn = await self._pool.acquire()
            self._cur = await self._conn.cursor()
            if self._statement_timeout is not None:
                # The server ends a statement past the timeout, and a transaction left idle
                # (a client stopped mid-way), so that no abandoned backend keeps the lock.
                milliseconds = int(self._statement_timeout * 1000)
                await self._cur.execute(
                    "BEGIN ISOLATION LEVEL READ COMMITTED;"
                    f" SET LOCAL statement_timeout = {milliseconds};"
                    f" SET LOCAL idle_in_transaction_session_timeout = {milliseconds}"
                )
        except BaseException as exc:
            conn = self._conn
            failure = _connect_failure(exc) if conn is None else exc
            await self._release()
            raise self._failed(failure, conn) from exc
        return self._cur

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        conn = self._conn
        try:
            if self._statement_timeout is not None:
                if exc is None:
                    await self._commit()
                else:
                    await self._roll_back()
        except BaseException as commit_exc:
            await self._release()
            raise self._failed(commit_exc, conn) from commit_exc
        await self._release()
        if exc is not None:
            translated = self._failed(exc, conn)
            if translated is not exc:
                raise translated from exc

    def _failed(self, exc: BaseException, conn: aiopg.Connection | None) -> BaseException:
        translated = _translate(exc, conn)
        # A lost or refused connection, or a host that turned read-only, may mean another host
        # took over; a denied privilege or a slow statement does not.
        if type(translated) is StoreUnavailable:
            self._on_failure()
        return translated

    async def _commit(self) -> None:
        cur = self._cur
        assert cur is not None
        if cur.closed:
            raise StoreUnavailable("PostgreSQL: the connection was lost before COMMIT")
        await cur.execute("COMMIT")
        # A COMMIT of a failed transaction answers ROLLBACK; a connection that dropped while
        # COMMIT was under way leaves its outcome unknown (a retry then finds duplicates).
        if cur.closed or cur.statusmessage != "COMMIT":
            status = "no answer" if cur.closed else cur.statusmessage
            raise StoreUnavailable(f"PostgreSQL: COMMIT not confirmed ({status})")

    async def _roll_back(self) -> None:
        cur, conn = self._cur, self._conn
        if cur is None or conn is None or cur.closed or conn.closed:
            return
        try:
            await cur.execute("ROLLBACK")
        except BaseException:
            # Not back to idle: the pool must not hand this connection out again.
            conn.close()
            raise

    async def _release(self) -> None:
        cur, conn = self._cur, self._conn
        self._cur = self._conn = None
        if cur is not None:
            cur.close()
        if conn is None:
            return
        if not conn.closed and _in_transaction(conn):
            conn.close()  # a connection left mid-transaction is closed, not pooled
        await self._pool.release(conn)


async def _create_pool(dsn: str, maxsize: int, timeout: float) -> aiopg.Pool:
    try:
        return await aiopg.create_pool(
            dsn,
            minsize=1,
            maxsize=maxsize,
            timeout=timeout + _CLIENT_MARGIN_S,
            enable_json=False,
            enable_hstore=False,
            enable_uuid=False,
        )
    except BaseException as exc:
        failure = _connect_failure(exc)
        if failure is exc:
            raise
        raise failure from exc


def _connect_failure(exc: BaseException) -> BaseException:
    """What a failure to open a connection is to the store: the aiopg connection that failed
    is closed at once (see :func:`_close_failed_connections`), and uvloop's RuntimeError on it
    is StoreUnavailable like any other failed connect."""
    if _close_failed_connections(exc) and isinstance(exc, RuntimeError):
        message = " ".join(str(exc).split())
        return StoreUnavailable(f"PostgreSQL: could not connect ({message})")
    return exc


def _close_failed_connections(exc: BaseException) -> bool:
    """Close, at once, the aiopg connections whose opening raised ``exc``; whether there
    were any.

    aiopg leaves a connection that failed to open (a host refusing connections) registered
    with the event loop, and only its finaliser, whenever the garbage collector gets to it,
    unregisters it. Under uvloop that registration is a poller closed by the error, kept under
    the file descriptor's number: the next connection given that number (the one to the new
    primary, after a failover) fails with "unable to perform operation on <UVPoll
    closed=True>", and so on until the collector runs. Closing the connection here, while its
    descriptor is still its own (nothing else ran since it failed), unregisters it.
    """
    found = False
    trace = exc.__traceback__
    while trace is not None:
        candidate = trace.tb_frame.f_locals.get("self")
        if isinstance(candidate, aiopg.Connection):
            found = True
            # One that failed before it had a socket (psycopg2 refused at once) registered
            # nothing; the others are closed also when psycopg2 counts them closed, since
            # aiopg's registration is not.
            if getattr(candidate, "_fileno", None) is not None:
                candidate.close()
        trace = trace.tb_next
    return found


def _in_transaction(conn: aiopg.Connection) -> bool:
    status = conn.raw.get_transaction_status()
    return bool(status != psycopg2.extensions.TRANSACTION_STATUS_IDLE)


def _translate(exc: BaseException, conn: aiopg.Connection | None = None) -> BaseException:
    if isinstance(exc, StoreUnavailable | RefusedByDatabase):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        # aiopg turns PostgreSQL's "canceling statement due to statement timeout" into a
        # CancelledError of its own, raised while handling the QueryCanceled; a cancellation
        # of the task itself stays what it is.
        task = asyncio.current_task()
        cancelled = task is not None and task.cancelling() > 0
        if cancelled or not isinstance(exc.__context__, psycopg2.errors.QueryCanceled):
            return exc
        exc = exc.__context__
    # libpq's messages span lines; a log line should not.
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return StatementTimedOut(f"PostgreSQL: {message}")
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return AccessDenied(f"PostgreSQL: {message}")
    # psycopg2 raises ValueError for text it cannot send (a NUL character, say).
    if isinstance(exc, psycopg2.DataError | psycopg2.IntegrityError | ValueError):
        return RefusedByDatabase(message)
    # A ProgrammingError (a missing table, say) is not the data's fault: it stays retryable.
    if isinstance(exc, psycopg2.Error | OSError | TimeoutError):
        return StoreUnavailable(f"PostgreSQL: {message}")
    # Under uvloop, aiopg's use of a connection whose socket is gone raises RuntimeError
    # ("unable to perform operation on <UVPoll closed=True>"): a lost connection, not a bug.
    if isinstance(exc, RuntimeError) and conn is not None and conn.closed:
        return StoreUnavailable(f"PostgreSQL: the connection was lost ({message})")
    return exc
