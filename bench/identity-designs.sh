#!/usr/bin/env bash
# Read cost of the two designs for identity changes after a build (issue 25), on the e2e
# benchmark's data (run `cargo bench --bench e2e` once first: it generates .work/bench/).
#
#     bench/identity-designs.sh        # about two minutes; prints a table of medians of 5
#
# A (built): windows store rows per identity and the overrides join runs at read time. The
# rewritten query is taken from a proxy's debug log and run directly, with and without its join.
# B (not built): windows store rows per entity and a read re-reads raw every identity whose
# override changed since the build; its extra branch is timed for 100 and 10,000 distinct ids.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
data=.work/bench/events-20000000
[ -d "$data/data" ] || { echo "no benchmark data in $data: run cargo bench --bench e2e first" >&2; exit 1; }
py=$(scripts/python-env.sh)
cargo build --release --quiet
work=$(mktemp -d)
cleanup() { kill "$proxy" "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$py" tests/chdb_server/server.py --data-dir "$data/data" --port-file "$work/port" >/dev/null 2>&1 &
server=$!
for _ in $(seq 60); do [ -s "$work/port" ] && break; sleep 1; done
upstream="http://127.0.0.1:$(cat "$work/port")/"
curl -sf --data-binary "CREATE DATABASE IF NOT EXISTS identity_designs" "$upstream" >/dev/null
target/release/preagg-proxy serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --log-format json \
    --log-filter info,preagg_proxy::proxy=debug --upstream "$upstream" --build wait \
    --build-wait-timeout 600s --preagg-database identity_designs --rules rules \
    --store "sqlite://$work/jobs.db" 2>"$work/proxy.log" &
proxy=$!
for _ in $(seq 60); do grep -q "engine ready" "$work/proxy.log" 2>/dev/null && break; sleep 1; done
listen=$("$py" -c 'import json,sys
for line in open(sys.argv[1]):
    if "\"serving\"" in line: print(json.loads(line)["listen"])' "$work/proxy.log")

lo='2026-10-01 09:57:00.000000'
hi='2026-10-28 14:30:00.000000'
# The benchmark's exposures body over its finished range.
sed -e "s/2026-10-03 07:15:00.000000/$lo/" -e "s/2026-10-20 16:40:00.250000/$hi/" \
    -e "s/'checkout-redesign'/'test-experiment'/" -e "s/\['control', 'test', 'test-2'\]/['control', 'test']/" \
    -e "s/events.team_id, 2)/events.team_id, 99999)/" fixtures/standalone_exposures_with_settings_and_format.sql \
    | sed -n '/^SELECT/,/^GROUP BY/p' >"$work/body.sql"
consumed() { printf 'SELECT variant, count() FROM (%s) GROUP BY variant ORDER BY variant SETTINGS transform_null_in=1' "$1"; }
consumed "$(cat "$work/body.sql")" >"$work/direct.sql"
header=$(curl -s -D - -o /dev/null --data-binary @"$work/direct.sql" "http://$listen/" | tr -d '\r' | grep -i '^x-preagg')
case "$header" in *rewritten*) ;; *) echo "the proxy did not rewrite: $header" >&2; exit 1 ;; esac
"$py" - "$work" <<'PY'
import json, sys
work = sys.argv[1]
line = [l for l in open(f"{work}/proxy.log") if '"rewritten query"' in l][-1]
sql = json.loads(line)["rewritten"]
open(f"{work}/a.sql", "w").write(sql)
# The same rows grouped by the event's person, without the read-time join.
union_end = sql.index(") AS `events` LEFT OUTER JOIN")
group = sql.index(" GROUP BY entity_id", union_end)
entity = "if(not(empty(events__override.distinct_id)), events__override.person_id, events.person_id)"
no_join = sql[:union_end].replace(entity, "events.person_id", 1) + ") AS `events`" + sql[group:]
open(f"{work}/a_no_join.sql", "w").write(no_join)
PY
changed() {
    local ids="(SELECT distinct_id FROM events WHERE team_id = 99999 AND event = '\$feature_flag_called' AND timestamp >= '2026-10-20' LIMIT $1)"
    consumed "$(sed "s/^WHERE and(/PREWHERE events.timestamp >= toDateTime64('$lo', 6, 'UTC') AND events.timestamp <= toDateTime64('$hi', 6, 'UTC') AND events.distinct_id IN $ids WHERE and(/" "$work/body.sql")"
}
changed 100 >"$work/b100.sql"
changed 10000 >"$work/b10000.sql"
median() {
    for _ in 1 2 3 4 5; do curl -s -o /dev/null -w '%{time_total}\n' --data-binary @"$1" "$upstream"; done | sort -n | sed -n 3p
}
echo "| what | seconds (median of 5) |"
echo "|---|---|"
echo "| the whole exposures body, direct | $(median "$work/direct.sql") |"
echo "| A: the rewritten query as sent (rows per identity, overrides joined at read time) | $(median "$work/a.sql") |"
echo "| A without its read-time join (grouped by the event's person) | $(median "$work/a_no_join.sql") |"
echo "| B: re-reading raw the exposures of 100 changed distinct ids | $(median "$work/b100.sql") |"
echo "| B: the same for 10,000 changed distinct ids | $(median "$work/b10000.sql") |"
