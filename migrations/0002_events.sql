-- 0002_events: the event log of the `sqlite` sink.
--
-- Applied by the migration runner (src/state/migrate.rs) to every database it opens: the state
-- database and every database a `sqlite` sink writes to. One numbered sequence for both, so a
-- sink that shares the state database commits events and checkpoints in one transaction, and
-- replay/serve read any of them the same way. Timestamps are RFC 3339 UTC text with
-- microseconds and `Z`, as in the JSON Lines format, so they sort chronologically as text.

CREATE TABLE events (
    -- Insertion order (an alias of the rowid, stable across VACUUM). `serve` tails the log by
    -- it and uses it as the resume key of events that have no id.
    pos         INTEGER PRIMARY KEY,
    -- The configured feed name.
    feed        TEXT    NOT NULL,
    -- The bridge's per-feed sequence number.
    seq         INTEGER NOT NULL CHECK (seq >= 0),
    -- The stream's last event ID as of this event ('' when none).
    id          TEXT    NOT NULL,
    -- The SSE event type ('message' when the stream named none).
    type        TEXT    NOT NULL,
    -- The data buffer exactly as the standard builds it.
    data        TEXT    NOT NULL,
    -- When the bridge parsed the event.
    received_at TEXT    NOT NULL
);

-- What makes an event a duplicate: inserts are INSERT OR IGNORE against this key. An event
-- with an id is identified by (feed, id, seq): a re-fetched event (resumed with Last-Event-ID)
-- and a replayed log carry the same id and seq, so they are stored once, while distinct events
-- that share an id (the standard keeps the last id for events without an `id:` field) are all
-- kept. An event without an id is identified by (feed, seq, received_at), so a log replayed
-- twice is stored once, but new events are never mistaken for old ones after a checkpoint
-- reset restarts the sequence numbers. Also serves lookups by (feed, id) for resuming.
CREATE UNIQUE INDEX events_identity
    ON events (feed, id, seq, (CASE WHEN id = '' THEN received_at ELSE '' END));

-- The queries replay and serve make: by feed and seq, by feed and type, by time.
CREATE INDEX events_feed_seq    ON events (feed, seq);
CREATE INDEX events_feed_type   ON events (feed, type, seq);
CREATE INDEX events_received_at ON events (received_at);
