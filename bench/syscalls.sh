#!/usr/bin/env bash
# System calls and CPU time, user and kernel, per pass-through request: the nginx hop (one worker
# process) and preagg-proxy (release) under the same wrk load against the static upstream
# (bench/queries/passthrough.sql). bench/instructions.sh counts user space only; this shows the
# other half of what a request costs the hop: how often it enters the kernel, with which calls,
# and how much of its CPU time is spent there. Prints a markdown report on stdout (progress on
# stderr):
#
#     bench/syscalls.sh | tee bench/results/syscalls-$(date +%F).md
#
# Each path: BENCH_WARMUP (2) seconds of load (not counted), then BENCH_SECONDS (10) seconds at
# BENCH_CONNECTIONS (1) with the process's CPU time read from /proc before and after, then as long
# again under `perf trace -s` (which counts every call of every thread of the process, and the
# calls that failed, EAGAIN included, without stopping it as strace would); each count is divided
# by the requests wrk completed in its own window. Needs perf with access to the raw_syscalls
# tracepoints (root, or kernel.perf_event_paranoid at -1). Environment:
#   BENCH_BASELINE (unset)   a git revision whose release build joins as "preagg-proxy --mode off @REV"
#   WRK_CONNECTION_CLOSE (0) 1: a new connection for every request (bench/wrk/post.lua), to count
#                            what accepting and closing a connection costs
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seconds=${BENCH_SECONDS:-10}
warmup=${BENCH_WARMUP:-2}
connections=${BENCH_CONNECTIONS:-1}
query="$bench/queries/passthrough.sql"
ticks_per_second=$(getconf CLK_TCK)

fresh_work syscalls
results="$work/results.tsv"
calls="$work/calls.tsv"
: >"$results"
: >"$calls"

prerequisites
command -v perf >/dev/null || die "perf is missing (Debian: linux-perf)"
perf trace -s -- true >/dev/null 2>&1 || die "perf trace cannot read the syscall tracepoints here (run as root)"

static_port=$(free_port)
say "Starting the static upstream"
start_static "$static_port"

# user_system_ticks PID: "user system" CPU time of process PID (all its threads), in clock ticks.
user_system_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

# measure PATH PORT PID: warms PATH up, times one load, traces another, and records
# "PATH requests user_µs/request system_µs/request" in $results and "PATH syscall
# calls/request errors/request" in $calls.
measure() {
    local path=$1 port=$2 pid=$3 url="http://127.0.0.1:$2/" before after requests trace_pid
    run_wrk "$connections" "$warmup" "$url" "$query" 10s >/dev/null
    before=$(user_system_ticks "$pid")
    requests=$(field requests "$(run_wrk "$connections" "$seconds" "$url" "$query" 10s)")
    after=$(user_system_ticks "$pid")
    [ "${requests:-0}" -gt 0 ] || die "$path: no request completed"
    awk -v path="$path" -v n="$requests" -v hz="$ticks_per_second" -v b="$before" -v a="$after" 'BEGIN {
        split(b, x, " "); split(a, y, " ");
        printf "%s\t%d\t%.2f\t%.2f\n", path, n, (y[1] - x[1]) * 1e6 / hz / n, (y[2] - x[2]) * 1e6 / hz / n }' >>"$results"

    say "$path under perf trace"
    perf trace -s -p "$pid" -o "$work/trace.txt" &
    trace_pid=$!
    sleep 1
    requests=$(field requests "$(run_wrk "$connections" "$seconds" "$url" "$query" 10s)")
    kill -INT "$trace_pid"
    wait "$trace_pid" || true
    [ "${requests:-0}" -gt 0 ] || die "$path: no request completed under perf trace"
    cp "$work/trace.txt" "$work/trace-$(tr -cs 'a-z0-9' '-' <<<"$path" | sed 's/-*$//').txt"
    # The summary has a table per thread: "name calls errors total min avg max stddev".
    awk -v path="$path" -v n="$requests" '
        $1 ~ /^[a-z_0-9]+$/ && $2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ && NF >= 8 {
            calls[$1] += $2; errors[$1] += $3 }
        END { for (name in calls) printf "%s\t%s\t%.3f\t%.3f\n", path, name, calls[name] / n, errors[name] / n }
    ' "$work/trace.txt" >>"$calls"
    say "$path: $(awk -F'\t' -v p="$path" '$1 == p { s += $3 } END { printf "%.2f", s }' "$calls") system calls per request"
}

# The nginx hop as one process (no master), so that its pid is the worker's: the server without
# an access log, and the one with (buffered, as preagg-proxy writes).
hop_port=$(free_port)
hop_logged_port=$(free_port)
render_hop 1 "$hop_port" "$(free_port)" "$static_port" "$(free_port)" "$hop_logged_port"
echo "master_process off;" >>"$work/hop.conf"
say "Starting the nginx hop (one worker)"
"$NGINX" -e "$work/hop.error.log" -c "$work/hop.conf" -p "$work" 2>>"$work/hop.error.log" &
hop_pid=$!
pids+=("$hop_pid")
wait_port "$hop_port"

path_names=(nginx "nginx, access log" "preagg-proxy --mode off" "preagg-proxy --mode off, no access log"
    "preagg-proxy --mode rewrite")
say "Starting preagg-proxy"
off_port=$(free_port)
quiet_port=$(free_port)
rewrite_port=$(free_port)
start_proxy off "$off_port" "http://127.0.0.1:$static_port" off
start_proxy quiet "$quiet_port" "http://127.0.0.1:$static_port" off --log-filter warn
start_proxy rewrite "$rewrite_port" "http://127.0.0.1:$static_port" rewrite
if [ -n "${BENCH_BASELINE:-}" ]; then
    baseline_port=$(free_port)
    PROXY_BIN=$(build_revision "$BENCH_BASELINE") start_proxy baseline "$baseline_port" \
        "http://127.0.0.1:$static_port" off
    path_names+=("preagg-proxy --mode off @$BENCH_BASELINE")
fi

quiet_machine
measure nginx "$hop_port" "$hop_pid"
measure "nginx, access log" "$hop_logged_port" "$hop_pid"
measure "preagg-proxy --mode off" "$off_port" "$PROXY_PID_off"
measure "preagg-proxy --mode off, no access log" "$quiet_port" "$PROXY_PID_quiet"
measure "preagg-proxy --mode rewrite" "$rewrite_port" "$PROXY_PID_rewrite"
if [ -n "${BENCH_BASELINE:-}" ]; then
    measure "preagg-proxy --mode off @$BENCH_BASELINE" "$baseline_port" "$PROXY_PID_baseline"
fi

{
    echo "# System calls and CPU time per pass-through request ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    machine_facts
    echo "- $(perf version); wrk 1 thread, $connections connection(s), ${warmup}s warm-up, then ${seconds}s timed and ${seconds}s traced"
    echo "- static upstream (nginx answering \`1\\n\` with ClickHouse's headers); nginx hop with one worker, no master; preagg-proxy with its $WORKERS worker threads"
    echo "- CPU time from /proc/PID/stat (all threads; ${ticks_per_second} ticks a second) over the timed window; calls counted by \`perf trace -s -p PID\` over the traced one"
    echo
    echo "| path | requests timed | user µs / request | kernel µs / request | system calls / request | failed calls / request |"
    echo "|---|---:|---:|---:|---:|---:|"
    awk -F'\t' 'NR == FNR { total[$1] += $3; failed[$1] += $4; next }
        { printf "| %s | %d | %.2f | %.2f | %.2f | %.2f |\n", $1, $2, $3, $4, total[$1], failed[$1] }' \
        "$calls" "$results"
    echo
    echo "Calls per request by system call (failed ones, such as reads that found nothing, in brackets; below 0.01 left out):"
    echo
    header="| system call |"
    rule="|---|"
    for path in "${path_names[@]}"; do header+=" $path |"; rule+="---:|"; done
    echo "$header"
    echo "$rule"
    for name in $(awk -F'\t' '$3 >= 0.01 { print $2 }' "$calls" | sort -u); do
        row="| $name |"
        for path in "${path_names[@]}"; do
            row+=" $(awk -F'\t' -v p="$path" -v s="$name" '$1 == p && $2 == s {
                if ($4 >= 0.01) printf "%.2f (%.2f)", $3, $4; else printf "%.2f", $3; found = 1 }
                END { if (!found) printf "0.00" }' "$calls") |"
        done
        echo "$row"
    done
} | tee "$work/report.md"
