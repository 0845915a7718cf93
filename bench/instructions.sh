#!/usr/bin/env bash
# User-space instructions per pass-through request, counted by valgrind's callgrind: the nginx hop
# (one worker process) and preagg-proxy (release) under the same wrk load against the static
# upstream (bench/queries/passthrough.sql). Unlike the timings of bench/load.sh, instruction counts
# do not move with the other tenants of a virtual machine, so small changes to the request path
# can be compared run to run. Kernel work (TCP, two sockets per request) is not counted: it is the
# same for every hop. Prints a markdown report on stdout (progress on stderr):
#
#     bench/instructions.sh | tee bench/results/instructions-$(date +%F).md
#
# Each path: started under callgrind, BENCH_WARMUP (2) seconds of load (not counted), counters
# zeroed, BENCH_SECONDS (5) seconds of load at BENCH_CONNECTIONS (16), counters dumped; the
# figure is the dump's instruction total over the requests wrk completed. Environment:
#   BENCH_BASELINE (unset)   a git revision whose release build joins as "preagg-proxy --mode off @REV"
#   BENCH_CACHE_SIM (unset)  1: callgrind also simulates the caches (--cache-sim=yes) and the report
#                            gives first-level instruction and data misses per request: how much
#                            code and data a request touches, which instruction counts do not show
#                            (the simulated caches are the process's own: no other tenant evicts)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seconds=${BENCH_SECONDS:-5}
warmup=${BENCH_WARMUP:-2}
connections=${BENCH_CONNECTIONS:-16}
cache_sim=()
[ "${BENCH_CACHE_SIM:-}" != 1 ] || cache_sim=(--cache-sim=yes)
query="$bench/queries/passthrough.sql"

fresh_work instructions
results="$work/results.tsv"
: >"$results"

prerequisites
command -v callgrind_control >/dev/null || apt_install valgrind

static_port=$(free_port)
say "Starting the static upstream"
start_static "$static_port"

# measure NAME PATH PORT READY COMMAND...: runs COMMAND under callgrind (files in $work/NAME.*),
# waits until it answers on PORT and its log has READY (a regular expression, or empty), counts
# one load, stops it, and records "PATH requests instructions".
measure() {
    local name=$1 path=$2 port=$3 ready=$4 pid requests total i
    shift 4
    say "$path under callgrind"
    valgrind --tool=callgrind "${cache_sim[@]}" --callgrind-out-file="$work/$name.callgrind" "$@" \
        >"$work/$name.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    for i in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || { cat "$work/$name.log" >&2; die "$path exited"; }
        if curl -sf -o /dev/null --data-binary @"$query" "http://127.0.0.1:$port/" &&
            { [ -z "$ready" ] || grep -q "$ready" "$work/$name.log"; }; then
            break
        fi
        [ "$i" -lt 600 ] || die "$path: not ready after 2 minutes"
        sleep 0.2
    done
    run_wrk "$connections" "$warmup" "http://127.0.0.1:$port/" "$query" 10s >/dev/null
    callgrind_control -z "$pid" >/dev/null
    requests=$(field requests "$(run_wrk "$connections" "$seconds" "http://127.0.0.1:$port/" "$query" 10s)")
    callgrind_control -d "$pid" >/dev/null
    for i in $(seq 1 100); do
        grep -qs '^totals:' "$work/$name.callgrind.1" && break
        sleep 0.2
    done
    # Ir, and with the cache simulation also Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
    local totals
    totals=$(sed -n 's/^totals: *//p' "$work/$name.callgrind.1" | head -1)
    total=${totals%% *}
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ "${requests:-0}" -gt 0 ] && [ -n "$total" ] || die "$path: no measurement"
    say "$path: $requests requests, $((total / requests)) instructions per request"
    printf '%s\t%s\t%s\n' "$path" "$requests" "$(tr ' ' '\t' <<<"$totals")" >>"$results"
}

# The nginx hop as one process (no master), so that callgrind sees the worker; once loaded on
# the server without an access log, once on the one with (buffered, as preagg-proxy writes).
hop_port=$(free_port)
hop_logged_port=$(free_port)
render_hop 1 "$hop_port" "$(free_port)" "$static_port" "$(free_port)" "$hop_logged_port"
echo "master_process off;" >>"$work/hop.conf"
measure nginx nginx "$hop_port" "" "$NGINX" -e "$work/hop.error.log" -c "$work/hop.conf" -p "$work"
measure nginx-logged "nginx, access log" "$hop_logged_port" "" "$NGINX" -e "$work/hop.error.log" \
    -c "$work/hop.conf" -p "$work"

# proxy NAME PATH BINARY MODE [FLAG...]
proxy() {
    local name=$1 path=$2 binary=$3 mode=$4 port admin
    shift 4
    port=$(free_port)
    admin=$(free_port)
    mkdir -p "$work/$name"
    # Unless the mode is off, queries pass through as store_unavailable until the engine is ready.
    local ready="engine ready"
    [ "$mode" != off ] || ready=""
    measure "$name" "$path" "$port" "$ready" "$binary" serve --listen "127.0.0.1:$port" \
        --admin-listen "127.0.0.1:$admin" --upstream "http://127.0.0.1:$static_port" --mode "$mode" \
        --rules "$repo/rules" --store "sqlite://$work/$name/jobs.db" "$@"
}
proxy off "preagg-proxy --mode off" "$PROXY_BIN" off
proxy rewrite "preagg-proxy --mode rewrite" "$PROXY_BIN" rewrite
proxy quiet "preagg-proxy --mode off, no access log" "$PROXY_BIN" off --log-filter warn
if [ -n "${BENCH_BASELINE:-}" ]; then
    proxy baseline "preagg-proxy --mode off @$BENCH_BASELINE" "$(build_revision "$BENCH_BASELINE")" off
fi

{
    echo "# User-space instructions per pass-through request ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    machine_facts
    echo "- callgrind ($(valgrind --version)); wrk 1 thread, $connections connections, ${warmup}s warm-up then ${seconds}s counted"
    echo "- static upstream (nginx answering \`1\\n\` with ClickHouse's headers); nginx hop with one worker, no master"
    echo "- instructions of the hop's process in user space (libraries included, kernel not)"
    echo
    if [ "${#cache_sim[@]}" -eq 0 ]; then
        echo "| path | requests counted | instructions / request | vs nginx |"
        echo "|---|---:|---:|---:|"
        awk -F'\t' '{ per = $3 / $2; if (NR == 1) base = per;
            printf "| %s | %d | %d | %.2f× |\n", $1, $2, per, per / base }' "$results"
    else
        echo "- simulated caches: $(grep -h '^desc: I1' "$work"/*.callgrind.1 | head -1 | sed 's/^desc: //'); $(grep -h '^desc: D1' "$work"/*.callgrind.1 | head -1 | sed 's/^desc: //')"
        echo
        echo "| path | requests counted | instructions / request | vs nginx | L1i misses / request | L1d misses / request |"
        echo "|---|---:|---:|---:|---:|---:|"
        awk -F'\t' '{ per = $3 / $2; if (NR == 1) base = per;
            printf "| %s | %d | %d | %.2f× | %d | %d |\n", $1, $2, per, per / base, $6 / $2, ($7 + $8) / $2 }' "$results"
    fi
} | tee "$work/report.md"
