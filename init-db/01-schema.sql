-- The orders service's schema. The service applies this file at every start, so each statement
-- must be idempotent; PostgreSQL's docker image also runs it once from /docker-entrypoint-initdb.d.
-- Every start while other workers run, too: once an object exists, applying this again must take
-- no table lock a running commit holds or waits for (ALTER TABLE, CREATE INDEX and CREATE
-- TRIGGER all would, and one start could deadlock with a running worker). So what cannot say
-- IF NOT EXISTS is done in a DO block that looks in the catalog first.

-- The event log. Append-only: the service inserts and selects, never updates or deletes.
-- seq is the replay order; order_uid is the idempotency key, so the first write of an order wins.
CREATE TABLE IF NOT EXISTS orders_events (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_uid   text        NOT NULL UNIQUE,
    event_type  text        NOT NULL,
    payload     jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Messages that are not orders, kept with the reason they were refused. source names where a
-- message came from (for NATS: stream and stream sequence). A redelivered message (same source,
-- same bytes) is dead-lettered once; another message under a source seen before (a stream
-- recreated, its sequences started again) is kept beside the first.
CREATE TABLE IF NOT EXISTS orders_dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    raw         bytea       NOT NULL,
    reason      text        NOT NULL,
    source      text,
    received_at timestamptz NOT NULL DEFAULT now()
);
-- Tables made by earlier versions had source alone UNIQUE, which dropped such a message.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'orders_dead_letters_source_key') THEN
        ALTER TABLE orders_dead_letters DROP CONSTRAINT orders_dead_letters_source_key;
    END IF;
    IF to_regclass('orders_dead_letters_source_raw_key') IS NULL THEN
        CREATE UNIQUE INDEX orders_dead_letters_source_raw_key
            ON orders_dead_letters (source, sha256(raw));
    END IF;
END $$;

-- Snapshot pages of the view, written by the service so that a start reads a few large values
-- instead of every row of the log; a cache of the log, never a source: each page is checked
-- against the log before the view takes it in (streams/snapshots.py), and one that disagrees is
-- dropped and its orders read from the log. A page covers the orders with
-- after_seq < seq <= last_seq; pages follow one another (the next one's after_seq is this one's
-- last_seq). body holds the orders as the view keeps them, compressed with the dictionary whose
-- digest dictionary_sha256 gives; body_sha256 is the digest of body.
CREATE TABLE IF NOT EXISTS orders_view_pages (
    after_seq         bigint      PRIMARY KEY,
    last_seq          bigint      NOT NULL CHECK (last_seq > after_seq),
    orders            integer     NOT NULL CHECK (orders > 0),
    dictionary_sha256 bytea       NOT NULL,
    body              bytea       NOT NULL,
    body_sha256       bytea       NOT NULL,
    written_by        text        NOT NULL,
    written_at        timestamptz NOT NULL DEFAULT now()
);
-- body is compressed already: stored out of line as it is, without pglz trying again.
DO $$
BEGIN
    IF (SELECT attstorage FROM pg_attribute
         WHERE attrelid = 'orders_view_pages'::regclass AND attname = 'body') <> 'e' THEN
        ALTER TABLE orders_view_pages ALTER COLUMN body SET STORAGE EXTERNAL;
    END IF;
END $$;

-- The one zstd dictionary of the pages, trained by the first writer on the log's first orders.
CREATE TABLE IF NOT EXISTS orders_view_dictionary (
    id         smallint    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    dictionary bytea       NOT NULL,
    sha256     bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Whatever changes or removes rows of the log (by hand: the service may not) drops every page,
-- so that the next start rebuilds the view from the log. Statement-level, so it costs nothing
-- per row; SECURITY DEFINER, so that it works for any role allowed to change the log. A page
-- that outlives a change made with triggers off is caught by the checks at start.
CREATE OR REPLACE FUNCTION orders_view_pages_drop() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    DELETE FROM orders_view_pages;
    RETURN NULL;
END $$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgrelid = 'orders_events'::regclass
                      AND tgname = 'orders_events_changed') THEN
        CREATE TRIGGER orders_events_changed
            AFTER UPDATE OR DELETE OR TRUNCATE ON orders_events
            FOR EACH STATEMENT EXECUTE FUNCTION orders_view_pages_drop();
    END IF;
END $$;
