"""Formats the RESULT lines collected by bench/load.sh as a markdown table: throughput, latency
percentiles, the latency each hop adds over direct at the same concurrency, and the CPU time the
hop spent per request (for direct: the upstream's own)."""

import sys
from collections import OrderedDict


def load(path):
    rows = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            section, query, hop, connections, fields = line.rstrip("\n").split("\t", 4)
            values = dict(pair.split("=", 1) for pair in fields.split())
            values = {k: int(v) for k, v in values.items()}
            rows.append((section, query, hop, int(connections), values))
    return rows


def ms(us):
    return f"{us / 1000:.3f}" if us < 10_000 else f"{us / 1000:.1f}"


def added(us, base):
    delta = us - base
    return ("+" if delta >= 0 else "-") + ms(abs(delta))


def main(path):
    rows = load(path)
    direct = {(s, c): v for s, _, h, c, v in rows if h == "direct"}
    sections = OrderedDict()
    for row in rows:
        sections.setdefault((row[0], row[1]), []).append(row)
    busiest = max((v.get("busy_before", 0) for *_, v in rows), default=0)
    print(f"Whole-machine CPU busy in the second before each cell: at most {busiest}% "
          "(cells after more than 10% are marked †).")
    print()
    titles = {"static": "Static upstream (nginx answering `1\\n`)", "clickhouse": "chdb-backed ClickHouse"}
    for (section, query), cells in sections.items():
        print(f"## {titles.get(section, section)}: {query}")
        print()
        counting = any(v["rewritten"] + v["not_rewritten"] for *_, v in cells)
        header = "| path | conns | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU µs/req | errors |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        if counting:
            header += " rewritten |"
            rule += "---:|"
        print(header)
        print(rule)
        for _, _, hop, connections, v in sorted(cells, key=lambda r: r[3]):
            base = direct.get((section, connections))
            rate = v["requests"] / (v["duration_us"] / 1e6)
            errors = sum(v[k] for k in ("err_connect", "err_read", "err_write", "err_timeout", "err_status"))
            if hop == "direct" or base is None:
                extra = ("—", "—")
            else:
                extra = (added(v["p50_us"], base["p50_us"]), added(v["p99_us"], base["p99_us"]))
            rate_text = f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"
            flag = " †" if v.get("busy_before", 0) > 10 else ""
            cpu = v["cpu_us"] / v["requests"] if v["requests"] else 0
            cpu_text = f"{cpu:.1f}" if cpu < 1000 else f"{cpu:,.0f}"
            line = (f"| {hop}{flag} | {connections} | {rate_text} | {ms(v['p50_us'])} | {ms(v['p99_us'])} | "
                    f"{extra[0]} | {extra[1]} | {cpu_text} | {errors} |")
            if counting:
                total = v["rewritten"] + v["not_rewritten"]
                line += f" {v['rewritten']}/{total} |" if hop.startswith("preagg") else " — |"
            print(line)
        print()


if __name__ == "__main__":
    main(sys.argv[1])
