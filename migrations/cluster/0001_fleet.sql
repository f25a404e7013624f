-- A fleet of bridges (ARCHITECTURE.md §9): who is alive, who reads which feed, and the state
-- the SQLite database holds for a single bridge (checkpoints and gaps).

-- One row per running instance, renewed every lease_ttl / 3; an instance is live while
-- expires_at is ahead of the database's clock.
CREATE TABLE IF NOT EXISTS sse_bridge_instances (
    instance   text        PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

-- One lease per feed. epoch grows by one on every claim; writes are fenced by it.
CREATE TABLE IF NOT EXISTS sse_bridge_leases (
    feed       text        PRIMARY KEY,
    owner      text,
    epoch      bigint      NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz
);

-- Checkpoints: as in the SQLite state database, plus the lease that wrote them.
CREATE TABLE IF NOT EXISTS sse_bridge_checkpoints (
    feed          text        NOT NULL,
    url           text        NOT NULL,
    last_event_id text        NOT NULL,
    seq           bigint      NOT NULL,
    updated_at    timestamptz NOT NULL,
    owner         text        NOT NULL,
    epoch         bigint      NOT NULL,
    PRIMARY KEY (feed, url)
);

-- Gaps: as in the SQLite state database, plus the instance that recorded them.
CREATE TABLE IF NOT EXISTS sse_bridge_gaps (
    id            bigserial   PRIMARY KEY,
    feed          text        NOT NULL,
    url           text        NOT NULL,
    reason        text        NOT NULL,
    detail        text        NOT NULL,
    last_event_id text        NOT NULL,
    seq           bigint      NOT NULL,
    at            timestamptz NOT NULL,
    repeats       bigint      NOT NULL DEFAULT 1,
    last_at       timestamptz NOT NULL,
    instance      text        NOT NULL
);
CREATE INDEX IF NOT EXISTS sse_bridge_gaps_feed ON sse_bridge_gaps (feed, id);
