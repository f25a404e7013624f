-- 0001_events (PostgreSQL): the event table of a `postgres` sink, and the sinks' cursors.
--
-- Applied by the postgres sink (src/sink/postgres/schema.rs) to each table it writes, inside
-- one transaction holding an advisory lock, together with its row in
-- sse_bridge_schema_migrations. `{table}` is the sink's validated table name (optionally
-- `schema.table`), `{prefix}` the schema part with its dot (or nothing), `{name}` the table
-- name with `.` as `_` for index names.

CREATE TABLE IF NOT EXISTS {table} (
    -- Insertion order: what `serve` tails and replay sorts by.
    pos         bigserial   PRIMARY KEY,
    -- The configured feed name.
    feed        text        NOT NULL,
    -- The bridge's per-feed sequence number.
    seq         bigint      NOT NULL CHECK (seq >= 0),
    -- The stream's last event ID as of this event ('' when none).
    id          text        NOT NULL,
    -- The SSE event type ('message' when the stream named none).
    type        text        NOT NULL,
    -- The data buffer exactly as the standard builds it.
    data        text        NOT NULL,
    -- The data as jsonb when the sink has `data_json = true` and it parses (NULL otherwise).
    data_json   jsonb,
    -- When the bridge parsed the event.
    received_at timestamptz NOT NULL
);

-- replay and serve read a feed in order, from a position or a time.
CREATE INDEX IF NOT EXISTS {name}_feed_seq ON {table} (feed, seq);
CREATE INDEX IF NOT EXISTS {name}_feed_id ON {table} (feed, id);
CREATE INDEX IF NOT EXISTS {name}_received_at ON {table} (received_at);

-- Each sink's cursor per feed: the last event it stored, moved in the same transaction as the
-- events (ARCHITECTURE.md §4). `target` is the events table.
CREATE TABLE IF NOT EXISTS {prefix}sse_bridge_cursors (
    target     text        NOT NULL,
    feed       text        NOT NULL,
    seq        bigint      NOT NULL,
    id         text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, feed)
);
