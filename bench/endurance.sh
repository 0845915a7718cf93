#!/usr/bin/env bash
# Endurance: BENCH_ENDURANCE_SECONDS (60) at BENCH_ENDURANCE_CONNECTIONS (200) concurrent
# connections against the static upstream, first direct, then through preagg-proxy (release, its
# defaults: --mode rewrite, SQLite job store, engine ready; the non-experiment query passes through
# with `not_experiment_query`). While the proxy is loaded, its resident memory and open file
# descriptors are read from /proc every second, and for BENCH_ENDURANCE_IDLE (15) seconds after the
# clients are gone. Prints a markdown report on stdout (progress on stderr):
#
#     bench/endurance.sh | tee bench/results/endurance-$(date +%F).md
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seconds=${BENCH_ENDURANCE_SECONDS:-60}
connections=${BENCH_ENDURANCE_CONNECTIONS:-200}
idle=${BENCH_ENDURANCE_IDLE:-15}
query="$bench/queries/passthrough.sql"

fresh_work endurance

prerequisites

static_port=$(free_port)
proxy_port=$(free_port)
say "Starting the static upstream and preagg-proxy"
start_static "$static_port"
start_proxy rewrite "$proxy_port" "http://127.0.0.1:$static_port" rewrite
pid=$PROXY_PID_rewrite

[ "$(curl -sS --data-binary @"$query" "http://127.0.0.1:$proxy_port/")" = 1 ] || die "the proxy does not answer 1"

quiet_machine
busy_direct=$BUSY
say "Direct: ${seconds}s at $connections connections"
direct=$(run_wrk "$connections" "$seconds" "http://127.0.0.1:$static_port/" "$query" 10s)
echo "$direct" >&2

# One line per second: second, VmRSS kB, open fds, threads.
samples="$work/samples.tsv"
: >"$samples"
sampler() {
    local i=0
    while kill -0 "$pid" 2>/dev/null && [ ! -e "$work/stop-sampling" ]; do
        printf '%s\t%s\t%s\t%s\n' "$i" "$(rss_kb "$pid")" "$(fds "$pid")" \
            "$(awk '/^Threads:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)" >>"$samples"
        i=$((i + 1))
        sleep 1
    done
}

quiet_machine
busy_proxy=$BUSY
say "preagg-proxy: ${seconds}s at $connections connections, sampling /proc/$pid every second"
sampler &
sampler_pid=$!
pids+=("$sampler_pid")
sleep 3 # the idle baseline: three samples before the load
proxied=$(run_wrk "$connections" "$seconds" "http://127.0.0.1:$proxy_port/" "$query" 10s)
echo "$proxied" >&2
load_end=$(wc -l <"$samples")
say "Clients gone; sampling ${idle}s more"
sleep "$idle"
touch "$work/stop-sampling"
wait "$sampler_pid" 2>/dev/null || true
kill -0 "$pid" 2>/dev/null || die "preagg-proxy died"
after=$(curl -sS --data-binary @"$query" "http://127.0.0.1:$proxy_port/")
peak_hwm=$(hwm_kb "$pid")

{
    echo "# Endurance: ${seconds}s at $connections connections ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    machine_facts
    echo "- static upstream (nginx answering \`1\\n\`), query bench/queries/passthrough.sql; wrk $WRK_THREADS thread(s)"
    echo "- preagg-proxy on its defaults (--mode rewrite, SQLite job store, engine ready, text log at info)"
    echo "- whole-machine CPU busy in the second before each run: direct ${busy_direct}%, preagg-proxy ${busy_proxy}%"
    echo
    python3 - "$samples" "$load_end" "$direct" "$proxied" "$peak_hwm" "$after" <<'EOF'
import sys

samples_path, load_end, direct, proxied, hwm, after = sys.argv[1:7]
load_end = int(load_end)
samples = [tuple(int(x) for x in line.split("\t")) for line in open(samples_path) if line.strip()]


def parse(line):
    return {k: int(v) for k, v in (p.split("=", 1) for p in line.split()[1:])}


def errors(v):
    return sum(v[k] for k in ("err_connect", "err_read", "err_write", "err_timeout", "err_status"))


print("| path | requests | req/s | p50 ms | p99 ms | max ms | errors (connect/read/write/timeout/status) |")
print("|---|---:|---:|---:|---:|---:|---|")
for name, line in (("direct", direct), ("preagg-proxy", proxied)):
    v = parse(line)
    detail = "/".join(str(v[k]) for k in ("err_connect", "err_read", "err_write", "err_timeout", "err_status"))
    print(f"| {name} | {v['requests']:,} | {v['requests'] / (v['duration_us'] / 1e6):,.0f} | "
          f"{v['p50_us'] / 1000:.2f} | {v['p99_us'] / 1000:.2f} | {v['max_us'] / 1000:.1f} | {errors(v)} ({detail}) |")
print()

start = samples[0]
loaded = samples[3:load_end]
end_of_load = samples[load_end - 1]
end = samples[-1]
peak_rss = max(s[1] for s in samples)
peak_fds = max(s[2] for s in samples)
print("| preagg-proxy | RSS MB | open fds | threads |")
print("|---|---:|---:|---:|")
print(f"| start (idle, before the load) | {start[1] / 1024:.1f} | {start[2]} | {start[3]} |")
print(f"| peak (sampled) | {peak_rss / 1024:.1f} | {peak_fds} | {max(s[3] for s in samples)} |")
print(f"| end of the load (second {end_of_load[0]}) | {end_of_load[1] / 1024:.1f} | {end_of_load[2]} | {end_of_load[3]} |")
print(f"| end ({len(samples) - load_end} s after the clients left) | {end[1] / 1024:.1f} | {end[2]} | {end[3]} |")
print(f"| VmHWM (peak RSS the kernel saw) | {int(hwm) / 1024:.1f} | | |")
print()
# Growth under steady load: RSS 10 s into the load against the last loaded second, and a
# least-squares slope over the loaded samples after the first 10 s.
steady = loaded[10:] if len(loaded) > 20 else loaded
if len(steady) >= 2:
    n = len(steady)
    xs = [s[0] for s in steady]
    ys = [s[1] for s in steady]
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))
    print(f"RSS under steady load (second {xs[0]} to {xs[-1]}): {ys[0] / 1024:.1f} MB -> {ys[-1] / 1024:.1f} MB, "
          f"least-squares slope {slope * 60 / 1024:+.2f} MB/min.")
print(f"After the run the proxy answers `{after}` (expected `1`).")
print()
print("<details><summary>Samples (second, RSS MB, fds, threads)</summary>")
print()
print("| s | RSS MB | fds | threads |")
print("|---:|---:|---:|---:|")
for s in samples:
    print(f"| {s[0]} | {s[1] / 1024:.1f} | {s[2]} | {s[3]} |")
print()
print("</details>")
EOF
} | tee "$work/report.md"
