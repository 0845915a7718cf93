"""Formats the RESULT lines collected by bench/load.sh as a markdown table: throughput, latency
percentiles, the latency each hop adds over direct at the same concurrency, and the CPU time the
hop spent per request (for direct: the upstream's own). Sections with a new connection per request
(NEW_CONNECTIONS) give the added mean time per request instead of added percentiles, since wrk's
latency clock leaves the connection's handshakes out.

With several rounds (BENCH_ROUNDS) a cell's figures are medians over its rounds (errors and
rewritten answers: totals), the added latency is taken within each round (against direct of the
same round) before the median, every round's added figure is listed, and a last table sets
preagg-proxy against nginx like for like, round by round."""

import statistics
import sys
from collections import OrderedDict

ERRORS = ("err_connect", "err_read", "err_write", "err_timeout", "err_status")

# preagg-proxy's paths and the nginx path each is compared with: both logging every request, or
# neither.
LIKE_FOR_LIKE = (
    ("preagg-proxy --mode off", "nginx, access log"),
    ("preagg-proxy --mode rewrite", "nginx, access log"),
    ("preagg-proxy --mode off, no access log", "nginx"),
    ("preagg-proxy --mode off, HTTPS", "nginx, HTTPS, access log"),
)


# Sections measured with a new connection per request.
NEW_CONNECTIONS = ("tls-handshake", "new-connections")


def load(path):
    rows = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            section, query, hop, connections, fields = line.rstrip("\n").split("\t", 4)
            values = dict(pair.split("=", 1) for pair in fields.split())
            values = {k: int(v) for k, v in values.items()}
            values.setdefault("round", 1)
            rows.append((section, query, hop, int(connections), values))
    return rows


def ms(us):
    return f"{us / 1000:.3f}" if abs(us) < 10_000 else f"{us / 1000:.1f}"


def signed(us):
    return ("+" if us >= 0 else "-") + ms(abs(us))


def median(values):
    return statistics.median(values) if values else 0


def mean_time(values, connections):
    """The mean time a request took on its connection, in microseconds: connections ÷ requests/s."""
    return connections * values["duration_us"] / values["requests"] if values["requests"] else 0


def main(path):
    rows = load(path)
    direct = {(s, c, v["round"]): v for s, _, h, c, v in rows if h == "direct"}
    rounds = max((v["round"] for *_, v in rows), default=1)
    sections = OrderedDict()
    for section, query, hop, connections, v in rows:
        cells = sections.setdefault((section, query), OrderedDict())
        cells.setdefault((connections, hop), []).append(v)
    busiest = max((v.get("busy_before", 0) for *_, v in rows), default=0)
    print(f"Whole-machine CPU busy in the second before each cell: at most {busiest}% "
          "(cells after more than 10% are marked †).")
    if rounds > 1:
        print(f"Figures are medians over {rounds} rounds; added latency is taken within each round.")
    print()
    titles = {
        "static": "Static upstream (nginx answering `1\\n`)",
        "tls": "Static upstream, TLS ended at the hop",
        "tls-handshake": "Static upstream, TLS ended at the hop, one connection per request",
        "new-connections": "Static upstream, one connection per request",
        "clickhouse": "chdb-backed ClickHouse",
    }
    added = {}  # (section, connections, hop) -> {round: added p50, or added mean time}
    for (section, query), cells in sections.items():
        print(f"## {titles.get(section, section)}: {query}")
        print()
        fresh = section in NEW_CONNECTIONS
        if fresh:
            print("wrk's latency clock starts once a connection is up, so the percentiles leave the "
                  "handshakes out. Here the added time is the mean time a request takes on its "
                  "connection, handshakes included (connections ÷ req/s), minus direct's.")
            print()
        counting = any(v["rewritten"] + v["not_rewritten"] for runs in cells.values() for v in runs)
        added_title = "added mean ms | —" if fresh else "added p50 ms | added p99 ms"
        header = f"| path | conns | req/s | p50 ms | p99 ms | {added_title} | CPU µs/req | errors |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        if counting:
            header += " rewritten |"
            rule += "---:|"
        if rounds > 1:
            header += f" added {'mean' if fresh else 'p50'} ms by round |"
            rule += "---|"
        print(header)
        print(rule)
        for (connections, hop), runs in sorted(cells.items(), key=lambda item: item[0][0]):
            bases = [direct.get((section, connections, v["round"])) for v in runs]
            rate = median([v["requests"] / (v["duration_us"] / 1e6) for v in runs])
            errors = sum(v[k] for v in runs for k in ERRORS)
            p50 = median([v["p50_us"] for v in runs])
            p99 = median([v["p99_us"] for v in runs])
            if hop == "direct" or None in bases:
                extra = ("—", "—")
                by_round = []
            elif fresh:
                by_round = [mean_time(v, connections) - mean_time(b, connections) for v, b in zip(runs, bases)]
                added[(section, connections, hop)] = {v["round"]: d for v, d in zip(runs, by_round)}
                extra = (signed(median(by_round)), "—")
            else:
                by_round = [v["p50_us"] - b["p50_us"] for v, b in zip(runs, bases)]
                added[(section, connections, hop)] = {v["round"]: d for v, d in zip(runs, by_round)}
                extra = (signed(median(by_round)), signed(median([v["p99_us"] - b["p99_us"] for v, b in zip(runs, bases)])))
            rate_text = f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"
            flag = " †" if any(v.get("busy_before", 0) > 10 for v in runs) else ""
            cpu = median([v["cpu_us"] / v["requests"] if v["requests"] else 0 for v in runs])
            cpu_text = f"{cpu:.1f}" if cpu < 1000 else f"{cpu:,.0f}"
            line = (f"| {hop}{flag} | {connections} | {rate_text} | {ms(p50)} | {ms(p99)} | "
                    f"{extra[0]} | {extra[1]} | {cpu_text} | {errors} |")
            if counting:
                rewritten = sum(v["rewritten"] for v in runs)
                total = sum(v["rewritten"] + v["not_rewritten"] for v in runs)
                line += f" {rewritten}/{total} |" if hop.startswith("preagg") else " — |"
            if rounds > 1:
                line += " " + (" ".join(signed(d) for d in by_round) or "—") + " |"
            print(line)
        print()
    if rounds > 1:
        like_for_like(added)


def like_for_like(added):
    """preagg-proxy's added latency against nginx's in the same rounds, path by path: the added p50,
    or with a new connection per request the added mean time per request."""
    print("## preagg-proxy against nginx, like for like")
    print()
    print("| conns | preagg-proxy path | nginx path | added | proxy ms (median) | nginx ms (median) | "
          "proxy − nginx ms (median of rounds) | rounds with proxy ≤ nginx |")
    print("|---:|---|---|---|---:|---:|---:|---:|")
    for (section, connections, hop), proxy in sorted(added.items(), key=lambda item: item[0][1]):
        for proxy_hop, nginx_hop in LIKE_FOR_LIKE:
            nginx = added.get((section, connections, nginx_hop))
            if hop != proxy_hop or nginx is None:
                continue
            rounds = sorted(set(proxy) & set(nginx))
            differences = [proxy[r] - nginx[r] for r in rounds]
            within = sum(1 for d in differences if d <= 0)
            measure = "mean, new connections" if section in NEW_CONNECTIONS else "p50"
            print(f"| {connections} | {proxy_hop} | {nginx_hop} | {measure} | {signed(median(list(proxy.values())))} | "
                  f"{signed(median(list(nginx.values())))} | {signed(median(differences))} | "
                  f"{within} of {len(differences)} |")
    print()


if __name__ == "__main__":
    main(sys.argv[1])
