-- PostHog's events schema, as the queries in shared/corpus/posthog expect it (see its README.md).
-- One statement per `;` at the end of a line: tests/data/generate.py sends them one by one,
-- since the HTTP interface takes one statement per request.

CREATE TABLE IF NOT EXISTS events
(
    uuid UUID,
    event String,
    properties String,
    timestamp DateTime64(6, 'UTC'),
    team_id Int64,
    distinct_id String,
    person_id UUID,
    `$session_id` String,
    elements_chain String,
    created_at DateTime64(6, 'UTC'),
    _timestamp DateTime,
    inserted_at Nullable(DateTime64(6, 'UTC')) DEFAULT now64()
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (team_id, toDate(timestamp), event, cityHash64(distinct_id), cityHash64(uuid));

CREATE TABLE IF NOT EXISTS person_distinct_id_overrides
(
    team_id Int64,
    distinct_id String,
    person_id UUID,
    is_deleted Int8,
    version Int64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (team_id, distinct_id);
