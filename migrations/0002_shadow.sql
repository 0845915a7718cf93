-- Shadow-mode mismatch samples, capped by the proxy (oldest deleted first).
CREATE TABLE IF NOT EXISTS preagg_shadow_samples (
    id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    rule TEXT NOT NULL,
    query_hashes TEXT NOT NULL,
    job_ids TEXT NOT NULL,
    original_rows BIGINT NOT NULL,
    rewritten_rows BIGINT NOT NULL,
    first_difference TEXT NOT NULL,
    original_query_id TEXT NOT NULL,
    rewritten_query_id TEXT NOT NULL,
    original_ms BIGINT NOT NULL,
    rewritten_ms BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS preagg_shadow_samples_created ON preagg_shadow_samples (created_at);
