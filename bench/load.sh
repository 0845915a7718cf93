#!/usr/bin/env bash
# Load, side by side in one run on loopback: the same requests direct to the upstream, through
# nginx `proxy_pass` (the reference cost of one HTTP hop) and through preagg-proxy (release), at
# the same concurrencies, with wrk. Prints a markdown report on stdout (progress on stderr):
#
#     bench/load.sh | tee bench/results/load-$(date +%F).md
#
# 1. Static upstream (nginx answering `1\n` with ClickHouse's headers, fast enough not to hide the
#    hop), a non-experiment SELECT (bench/queries/passthrough.sql): direct, nginx, preagg-proxy
#    `--mode off` (pure pass-through) and preagg-proxy `--mode rewrite` (the default: the query is
#    read, the prefilter dismisses it: `passthrough reason=not_experiment_query`), and `--mode off`
#    with `--log-filter warn` (no access-log line). nginx runs twice, as preagg-proxy does: without
#    an access log, and with one buffered line per request (like preagg-proxy's default).
# 2. HTTPS (section `tls`, not run unless named): the same SELECT with TLS ended at the hop (a
#    self-signed P-256 certificate; the upstream stays plain HTTP): direct (plain HTTP, the
#    baseline), nginx `listen ... ssl` with its access log, preagg-proxy `--mode off` with
#    tls_cert_file/tls_key_file and its access log. Keep-alive connections: a handshake per
#    connection, the records' encryption per request.
#    Section `tls-handshake` (not run unless named) measures the same paths with a new connection
#    for every request (`Connection: close`): a full TLS handshake per request at the hop (and a
#    TCP handshake per request everywhere, direct included). wrk's latency clock starts once a
#    connection is up, so there the handshake's cost is in requests/s and CPU µs/req.
#    Section `new-connections` (not run unless named) does the same over plain HTTP: direct, nginx
#    with its access log, preagg-proxy `--mode off`, a TCP connection per request.
# 3. The chdb-backed ClickHouse with generated PostHog data, the experiment query of
#    scripts/demo/experiment.sql: direct and through nginx (the original query), through
#    preagg-proxy warm (every answer counted as rewritten by its X-Preagg header).
#
# Installs nginx and wrk (apt) when missing, builds the proxy, starts everything on free ports,
# stops everything at the end. Environment:
#   BENCH_SECONDS (15)            measured seconds per static cell (after BENCH_WARMUP, 2, unmeasured)
#   BENCH_CONNECTIONS ("1 16 64") concurrencies of the static section
#   BENCH_CH_SECONDS (30)         measured seconds per chdb cell
#   BENCH_CH_CONNECTIONS ("1 16 64")
#   BENCH_EVENTS (1000000)        generated events (kept in .work/bench-data and reused)
#   BENCH_WRK_THREADS (1)         wrk threads (the machine running everything has few cores)
#   BENCH_ROUNDS (1)              rounds of the static section: at each concurrency every path is
#                                 measured once per round, the paths in a rotated order each round;
#                                 the report gives medians over the rounds and each round's added p50
#   BENCH_SECTIONS ("static clickhouse"; "tls" and "tls-handshake" add the HTTPS sections,
#                                 "new-connections" the plain one with a connection per request)
#   BENCH_BASELINE (unset)        a git revision: its release build joins the static section as
#                                 "preagg-proxy --mode off @REV", a before/after in one run
#                                 (built once in .work/baseline-REV)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seconds=${BENCH_SECONDS:-15}
warmup=${BENCH_WARMUP:-2}
connections=${BENCH_CONNECTIONS:-1 16 64}
ch_seconds=${BENCH_CH_SECONDS:-30}
ch_connections=${BENCH_CH_CONNECTIONS:-1 16 64}
events=${BENCH_EVENTS:-1000000}
sections=${BENCH_SECTIONS:-static clickhouse}
rounds=${BENCH_ROUNDS:-1}
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive number, not '$rounds'"

fresh_work load
results="$work/results.tsv"
: >"$results"

prerequisites
quiet_machine

passthrough_query="$bench/queries/passthrough.sql"
experiment_query="$repo/scripts/demo/experiment.sql"

# Ports.
static_port=$(free_port)
hop_static_port=$(free_port)
hop_clickhouse_port=$(free_port)
hop_logged_port=$(free_port)
hop_tls_port=$(free_port)
proxy_off_port=$(free_port)
proxy_quiet_port=$(free_port)
proxy_rewrite_port=$(free_port)
proxy_tls_port=$(free_port)
proxy_clickhouse_port=$(free_port)

CLICKHOUSE_PORT=$(free_port) # replaced by the real one when the chdb section runs
if [[ " $sections " == *" clickhouse "* ]]; then
    say "Starting the chdb-backed ClickHouse ($events events)"
    start_clickhouse "$events"
fi

say "Starting the static upstream, the nginx hop and preagg-proxy"
start_static "$static_port"
start_hop "$hop_static_port" "$hop_clickhouse_port" "$static_port" "$CLICKHOUSE_PORT" "$hop_logged_port" \
    "$hop_tls_port"
start_proxy off "$proxy_off_port" "http://127.0.0.1:$static_port" off
start_proxy quiet "$proxy_quiet_port" "http://127.0.0.1:$static_port" off --log-filter warn
start_proxy rewrite "$proxy_rewrite_port" "http://127.0.0.1:$static_port" rewrite
static_paths=(direct nginx "nginx, access log" "preagg-proxy --mode off" "preagg-proxy --mode off, no access log" "preagg-proxy --mode rewrite")
if [ -n "${BENCH_BASELINE:-}" ]; then
    baseline_path="preagg-proxy --mode off @$BENCH_BASELINE"
    proxy_baseline_port=$(free_port)
    PROXY_BIN=$(build_revision "$BENCH_BASELINE") start_proxy baseline "$proxy_baseline_port" \
        "http://127.0.0.1:$static_port" off
    static_paths+=("$baseline_path")
fi

# negotiated PORT: the TLS version and cipher a client of OpenSSL's defaults (as wrk) gets.
negotiated() {
    openssl s_client -connect "127.0.0.1:$1" -servername localhost </dev/null 2>/dev/null |
        sed -n 's/^New, \(.*\), Cipher is \(.*\)$/\1 \2/p'
}

# cell SECTION QUERY PATH CONNECTIONS URL BODY SECONDS TIMEOUT COUNT PID [ROUND]: one measured wrk
# run; PID is the process serving the path (the hop, or the upstream for direct), whose CPU time
# during the run is recorded.
cell() {
    local line before after
    say "$1 / $3 / $4 connections (${7}s)${11:+, round ${11}}"
    before=$(cpu_ticks "${10}")
    line=$(run_wrk "$4" "$7" "$5" "$6" "$8" "$9")
    after=$(cpu_ticks "${10}")
    echo "$line" >&2
    printf '%s\t%s\t%s\t%s\t%s busy_before=%s cpu_us=%s round=%s\n' "$1" "$2" "$3" "$4" "${line#RESULT }" "$BUSY" \
        "$(((after - before) * 1000000 / $(getconf CLK_TCK)))" "${11:-1}" >>"$results"
}

# measure_paths SECTION QUERY URLS PIDS PATH...: every PATH at each of $connections, in $rounds
# rounds, after a warm-up; URLS and PIDS name associative arrays keyed by path.
measure_paths() {
    local section=$1 query=$2 c round i path
    local -n urls=$3 path_pids=$4
    shift 4
    local paths=("$@")
    for c in $connections; do
        for round in $(seq 1 "$rounds"); do
            # Each round starts one path later, so that no path always follows the same one.
            for i in $(seq 0 $((${#paths[@]} - 1))); do
                path=${paths[$(((i + round - 1) % ${#paths[@]}))]}
                quiet_machine
                run_wrk "$c" "$warmup" "${urls[$path]}/" "$passthrough_query" 10s >/dev/null
                cell "$section" "$query" "$path" "$c" "${urls[$path]}/" "$passthrough_query" \
                    "$seconds" 10s 0 "${path_pids[$path]}" "$round"
            done
        done
    done
}

# The plain paths to the static upstream, and the processes serving them.
declare -A static_urls=(
    [direct]="http://127.0.0.1:$static_port"
    [nginx]="http://127.0.0.1:$hop_static_port"
    ["nginx, access log"]="http://127.0.0.1:$hop_logged_port"
    ["preagg-proxy --mode off"]="http://127.0.0.1:$proxy_off_port"
    ["preagg-proxy --mode off, no access log"]="http://127.0.0.1:$proxy_quiet_port"
    ["preagg-proxy --mode rewrite"]="http://127.0.0.1:$proxy_rewrite_port"
)
[ -z "${baseline_path:-}" ] || static_urls[$baseline_path]="http://127.0.0.1:$proxy_baseline_port"
declare -A static_pids=(
    [direct]=$(cat "$work/static.pid")
    [nginx]=$(cat "$work/hop.pid")
    ["nginx, access log"]=$(cat "$work/hop.pid")
    ["preagg-proxy --mode off"]=$PROXY_PID_off
    ["preagg-proxy --mode off, no access log"]=$PROXY_PID_quiet
    ["preagg-proxy --mode rewrite"]=$PROXY_PID_rewrite
)
[ -z "${baseline_path:-}" ] || static_pids[$baseline_path]=$PROXY_PID_baseline

if [[ " $sections " == *" static "* ]]; then
    say "Checking the static paths"
    [ "$(curl -sS --data-binary @"$passthrough_query" "http://127.0.0.1:$static_port/")" = 1 ] || die "static upstream"
    [ "$(preagg_header "http://127.0.0.1:$proxy_off_port" "$passthrough_query")" = "passthrough reason=mode_off" ] ||
        die "preagg-proxy --mode off does not answer with mode_off"
    [ "$(preagg_header "http://127.0.0.1:$proxy_rewrite_port" "$passthrough_query")" = \
        "passthrough reason=not_experiment_query" ] || die "preagg-proxy --mode rewrite: unexpected X-Preagg"
    measure_paths static "pass-through SELECT" static_urls static_pids "${static_paths[@]}"
fi

if [[ " $sections " == *" new-connections "* ]]; then
    fresh_paths=(direct "nginx, access log" "preagg-proxy --mode off")
    [ -z "${baseline_path:-}" ] || fresh_paths+=("$baseline_path")
    WRK_CONNECTION_CLOSE=1 measure_paths new-connections "pass-through SELECT, a new connection per request" \
        static_urls static_pids "${fresh_paths[@]}"
fi

if [[ " $sections " == *" tls "* || " $sections " == *" tls-handshake "* ]]; then
    start_proxy tls "$proxy_tls_port" "http://127.0.0.1:$static_port" off \
        --tls-cert-file "$work/tls/cert.pem" --tls-key-file "$work/tls/key.pem"
    say "Checking the HTTPS paths"
    for port in "$hop_tls_port" "$proxy_tls_port"; do
        [ "$(curl -sS --cacert "$work/tls/cert.pem" --data-binary @"$passthrough_query" \
            "https://localhost:$port/")" = 1 ] || die "no answer over HTTPS on port $port"
    done
    tls_nginx=$(negotiated "$hop_tls_port")
    tls_proxy=$(negotiated "$proxy_tls_port")
    tls_paths=(direct "nginx, HTTPS, access log" "preagg-proxy --mode off, HTTPS")
    declare -A tls_urls=(
        [direct]="http://127.0.0.1:$static_port"
        ["nginx, HTTPS, access log"]="https://127.0.0.1:$hop_tls_port"
        ["preagg-proxy --mode off, HTTPS"]="https://127.0.0.1:$proxy_tls_port"
    )
    declare -A tls_pids=(
        [direct]=$(cat "$work/static.pid")
        ["nginx, HTTPS, access log"]=$(cat "$work/hop.pid")
        ["preagg-proxy --mode off, HTTPS"]=$PROXY_PID_tls
    )
    if [[ " $sections " == *" tls "* ]]; then
        measure_paths tls "pass-through SELECT over HTTPS" tls_urls tls_pids "${tls_paths[@]}"
    fi
    if [[ " $sections " == *" tls-handshake "* ]]; then
        WRK_CONNECTION_CLOSE=1 measure_paths tls-handshake "pass-through SELECT over HTTPS, a new connection per request" \
            tls_urls tls_pids "${tls_paths[@]}"
    fi
fi

if [[ " $sections " == *" clickhouse "* ]]; then
    start_proxy clickhouse "$proxy_clickhouse_port" "http://127.0.0.1:$CLICKHOUSE_PORT" rewrite
    say "Warming the experiment query through preagg-proxy (background builds)"
    wait_rewritten "http://127.0.0.1:$proxy_clickhouse_port" "$experiment_query"
    curl -sS --data-binary @"$experiment_query" "http://127.0.0.1:$CLICKHOUSE_PORT/" >"$work/answer-direct"
    curl -sS --data-binary @"$experiment_query" "http://127.0.0.1:$hop_clickhouse_port/" >"$work/answer-nginx"
    curl -sS --data-binary @"$experiment_query" "http://127.0.0.1:$proxy_clickhouse_port/" >"$work/answer-proxy"
    cmp -s "$work/answer-direct" "$work/answer-nginx" || die "nginx answers differently"
    cmp -s "$work/answer-direct" "$work/answer-proxy" || die "the rewritten answer differs from the direct one"
    declare -A ch_urls=(
        [direct]="http://127.0.0.1:$CLICKHOUSE_PORT"
        [nginx]="http://127.0.0.1:$hop_clickhouse_port"
        ["preagg-proxy (rewritten)"]="http://127.0.0.1:$proxy_clickhouse_port"
    )
    declare -A ch_pids=(
        [direct]=$CLICKHOUSE_PID
        [nginx]=$(cat "$work/hop.pid")
        ["preagg-proxy (rewritten)"]=$PROXY_PID_clickhouse
    )
    for c in $ch_connections; do
        for path in direct nginx "preagg-proxy (rewritten)"; do
            quiet_machine
            cell clickhouse "experiment query" "$path" "$c" "${ch_urls[$path]}/" "$experiment_query" \
                "$ch_seconds" 300s 1 "${ch_pids[$path]}"
        done
    done
fi

{
    echo "# Load: direct vs nginx vs preagg-proxy ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    machine_facts
    echo "- wrk $WRK_THREADS thread(s), load generator, upstreams and hops on the same machine (loopback)"
    echo "- static cells: ${warmup}s warm-up then ${seconds}s measured, $rounds round(s); chdb cells: ${ch_seconds}s measured"
    if [[ " $sections " == *" clickhouse "* ]]; then
        echo "- chdb data: $events generated events (28 days, seed 42); query: scripts/demo/experiment.sql"
    fi
    echo "- preagg-proxy on its defaults (SQLite job store, engine ready, text log at info with one access line per request)"
    if [[ " $sections " == *" tls "* || " $sections " == *" tls-handshake "* ]]; then
        echo "- HTTPS as negotiated by OpenSSL's defaults ($(openssl version | cut -d' ' -f1-2), as wrk): nginx $tls_nginx; preagg-proxy $tls_proxy"
    fi
    echo
    python3 "$bench/table.py" "$results"
} | tee "$work/report.md"
