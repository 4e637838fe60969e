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
-- message came from (for NATS: stream and stream sequence) and is unique when known, so a
-- redelivered message is dead-lettered once.
CREATE TABLE IF NOT EXISTS orders_dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    raw         bytea       NOT NULL,
    reason      text        NOT NULL,
    source      text        UNIQUE,
    received_at timestamptz NOT NULL DEFAULT now()
);
