-- The orders service's schema. The service applies this file at every start, so each statement
-- must be idempotent; PostgreSQL's docker image also runs it once from /docker-entrypoint-initdb.d.

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
END $$;
CREATE UNIQUE INDEX IF NOT EXISTS orders_dead_letters_source_raw_key
    ON orders_dead_letters (source, sha256(raw));
