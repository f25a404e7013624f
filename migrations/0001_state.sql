-- 0001_state: the state store (checkpoints and gaps).
--
-- Applied by sse-bridge's migration runner (src/state/migrate.rs) inside one transaction,
-- together with its row in schema_migrations. Timestamps are RFC 3339 UTC text with
-- microseconds and `Z` (e.g. 2026-11-24T08:00:00.123456Z), so they sort chronologically.

-- A feed's durable cursor: the Last-Event-ID sent after a restart. Keyed by feed and URL so
-- that a feed whose URL changed does not resume with an ID from another stream.
CREATE TABLE checkpoints (
    feed          TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    last_event_id TEXT    NOT NULL,
    seq           INTEGER NOT NULL CHECK (seq >= 0),
    updated_at    TEXT    NOT NULL,
    PRIMARY KEY (feed, url)
);

-- Moments when a feed could not resume faithfully (events may be missing). `id` is an alias
-- of the table's rowid: the order in which gaps were recorded.
CREATE TABLE gaps (
    id            INTEGER PRIMARY KEY,
    feed          TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    detail        TEXT    NOT NULL,
    last_event_id TEXT    NOT NULL,
    seq           INTEGER NOT NULL CHECK (seq >= 0),
    at            TEXT    NOT NULL
);

CREATE INDEX gaps_feed_at ON gaps (feed, at);
