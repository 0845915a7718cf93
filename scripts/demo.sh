#!/usr/bin/env bash
# The main job on the embedded defaults, on a fresh machine:
#   1. installs the Python environment (chdb-core: the real ClickHouse engine) and builds the proxy;
#   2. starts the chdb-backed ClickHouse on 127.0.0.1:8123 with generated PostHog data;
#   3. starts preagg-proxy on its defaults (127.0.0.1:8124, admin 127.0.0.1:8125, SQLite job store);
#   4. sends the same experiment query direct, then through the proxy cold and warm, and shows the
#      answers, the timings and the X-Preagg lines;
#   5. prints how long each step took.
# DEMO_EVENTS (default 2000000) sets the data size. DEMO_KEEP=1 keeps ClickHouse and the proxy up
# at the end, with the status page on http://127.0.0.1:8125/admin, until Ctrl-C.
# Everything lives in .work/demo. On 2 cores a run took 5 min 17 s (2026-12-08), 5 min of it the
# release build (fat LTO, one codegen unit); later runs reuse the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
events=${DEMO_EVENTS:-2000000}
work="$repo/.work/demo"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# Steps and how long each took, printed as they end and again at the end.
step_names=()
step_seconds=()
step_title=""
step_started=$SECONDS
minutes() { if (($1 >= 60)); then printf '%d min %02d s' $(($1 / 60)) $(($1 % 60)); else printf '%d s' "$1"; fi; }
end_step() {
    [ -n "$step_title" ] || return 0
    local took=$((SECONDS - step_started))
    step_names+=("$step_title")
    step_seconds+=("$took")
    printf '   (took %s)\n' "$(minutes "$took")"
    step_title=""
}
step() { end_step; step_title=$1; step_started=$SECONDS; say "$1"; }
free_port() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for port in 8123 8124 8125; do
    free_port "$port" || { echo "demo: port $port is in use; stop what listens there first" >&2; exit 1; }
done

step "Installing the Python environment (.venv; the first time downloads chdb-core, about 180 MB)"
python=$(scripts/python-env.sh -v)

step "Building preagg-proxy (release)"
echo "The first build took 5 minutes on 2 cores here (fat LTO); later runs reuse it."
cargo build --release --locked
proxy_bin="$repo/target/release/preagg-proxy"

rm -rf "$work" && mkdir -p "$work" && ln -s "$repo/rules" "$work/rules"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

step "Starting the chdb-backed ClickHouse on 127.0.0.1:8123"
"$python" tests/chdb_server/server.py --data-dir "$work/clickhouse" --port 8123 --port-file "$work/clickhouse.port" \
    >"$work/clickhouse.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$work/clickhouse.port" ] && break; sleep 0.1; done
[ -s "$work/clickhouse.port" ] || { cat "$work/clickhouse.log" >&2; exit 1; }

step "Generating $events PostHog events (28 days from 2026-10-01, seed 42)"
"$python" tests/data/generate.py --url http://127.0.0.1:8123 --events "$events" --seed 42 --start 2026-10-01 --days 28 \
    | "$python" -c 'import json,sys; s=json.loads(sys.stdin.read().strip().splitlines()[-1]); print("rows:", s["rows"], "in", s["elapsed_seconds"]["total"], "s")'

step "Starting preagg-proxy on its defaults (listen 127.0.0.1:8124, upstream 127.0.0.1:8123, SQLite store)"
(cd "$work" && exec "$proxy_bin" serve) >"$work/proxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:8125/readyz >/dev/null && break; sleep 0.1; done
curl -sf http://127.0.0.1:8125/readyz >/dev/null || { cat "$work/proxy.log" >&2; exit 1; }

query="$repo/scripts/demo/experiment.sql"
run() { # run LABEL URL
    local headers="$work/headers" body="$work/body" seconds
    seconds=$(curl -sS -o "$body" -D "$headers" -w '%{time_total}' --data-binary @"$query" "$2/?default_format=PrettyCompactMonoBlock")
    printf '%-28s %6.3f s   %s\n' "$1" "$seconds" "$(grep -i '^x-preagg:' "$headers" | tr -d '\r' || echo '(direct: no X-Preagg)')"
    cp "$body" "$work/answer-$(echo "$1" | tr ' ' '-')"
}

step "The experiment query (scripts/demo/experiment.sql)"
run "direct to ClickHouse" http://127.0.0.1:8123
cat "$work/answer-direct-to-ClickHouse"
run "proxy, cold" http://127.0.0.1:8124
for _ in $(seq 1 600); do # background builds: wait until the windows are ready
    curl -s --data-binary @"$query" -D - -o /dev/null http://127.0.0.1:8124/ | grep -qi 'x-preagg: rewritten' && break
    sleep 0.2
done
for i in 1 2 3; do run "proxy, warm ($i)" http://127.0.0.1:8124; done
cat "$work/answer-proxy,-warm-(3)"
if cmp -s "$work/answer-direct-to-ClickHouse" "$work/answer-proxy,-warm-(3)"; then
    echo "The warm answer is identical to the direct one."
else
    echo "demo: the warm answer differs from the direct one" >&2
    exit 1
fi

step "What the proxy did"
# `--rules` is the `rules` configuration key as a flag: explain takes --config and every key's flag.
"$proxy_bin" explain --rules "$repo/rules" "$query" | sed -n '1,8p'
curl -s http://127.0.0.1:8125/admin/jobs | "$python" -c 'import json,sys; j=json.load(sys.stdin)["jobs"]; print(len(j), "jobs,", sum(x["rows_written"] or 0 for x in j), "preaggregated rows")'
end_step

say "How long each step took"
for i in "${!step_names[@]}"; do
    printf '  %10s  %s\n' "$(minutes "${step_seconds[$i]}")" "${step_names[$i]}"
done
printf '  %10s  %s\n' "$(minutes "$SECONDS")" "in all"

if [ "${DEMO_KEEP:-0}" = 1 ]; then
    say "Keeping ClickHouse (127.0.0.1:8123) and preagg-proxy (127.0.0.1:8124) up; Ctrl-C stops both"
    echo "status page: http://127.0.0.1:8125/admin   metrics: http://127.0.0.1:8125/metrics"
    echo "logs: $work/proxy.log, $work/clickhouse.log"
    # Ctrl-C ends the wait; the EXIT trap then stops both servers.
    trap 'exit 0' INT TERM
    wait
else
    echo
    echo "Both servers stop now. DEMO_KEEP=1 scripts/demo.sh keeps them up, with the status page on"
    echo "http://127.0.0.1:8125/admin."
fi
