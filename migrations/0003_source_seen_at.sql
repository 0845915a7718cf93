-- When a build started reading its source, by ClickHouse's clock (microseconds since the Unix
-- epoch): the rows ingested, and the mutations created, since then are what the build did not see.
ALTER TABLE preagg_jobs ADD COLUMN source_seen_at BIGINT;
