-- Jobs: one row per (team, query hash, window) build attempt. Instants are microseconds since the
-- Unix epoch (UTC), stored as BIGINT so that SQLite and PostgreSQL read them the same way.
CREATE TABLE IF NOT EXISTS preagg_jobs (
    id TEXT PRIMARY KEY,
    team_id BIGINT NOT NULL,
    rule TEXT NOT NULL,
    query_hash TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    window_end BIGINT NOT NULL,
    status TEXT NOT NULL,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    attempts BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    computed_at BIGINT,
    expires_at BIGINT,
    rows_written BIGINT,
    error TEXT
);

-- At most one pending job per window: the lock that lets several proxies share one store.
CREATE UNIQUE INDEX IF NOT EXISTS preagg_jobs_one_pending
    ON preagg_jobs (team_id, query_hash, window_start, window_end) WHERE status = 'pending';

CREATE INDEX IF NOT EXISTS preagg_jobs_lookup ON preagg_jobs (team_id, query_hash, status, window_start);

-- Shapes: what a query hash computes, and the ClickHouse types of its stored columns.
CREATE TABLE IF NOT EXISTS preagg_shapes (
    query_hash TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    shape TEXT NOT NULL,
    column_names TEXT NOT NULL,
    column_types TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
