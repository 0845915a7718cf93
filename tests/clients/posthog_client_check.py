"""Runs experiment queries through clickhouse-connect configured as PostHog configures it when
CLICKHOUSE_USE_HTTP is set (posthog/clickhouse/client/connection.py: a client made with
autogenerate_session_id=True and a huge send_receive_timeout, compression on, whose queries pass
pyformat `parameters`, a `settings` dict holding `query_id`, and column_oriented results), and
prints what the library returned, as JSON. The Rust test runs it against the server directly and
through the proxy.

    posthog_client_check.py URL QUERY_ID_PREFIX < queries.json   # [{"name": ..., "sql": ..., "flag": ...}]
"""

import json
import sys
from urllib.parse import urlsplit

import clickhouse_connect


def rounded(value):
    """Floats to 9 significant digits: a rewritten sum adds in another order than the original."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    return value


def main(url: str, prefix: str) -> None:
    parts = urlsplit(url)
    client = clickhouse_connect.get_client(
        host=parts.hostname,
        port=parts.port,
        username="default",
        password="",
        autogenerate_session_id=True,
        send_receive_timeout=999999999,
        compress=True,
    )
    out = []
    for i, query in enumerate(json.load(sys.stdin)):
        # HogQL prints values as pyformat placeholders; the library binds them client-side.
        sql = query["sql"].replace(f"'{query['flag']}'", "%(hogql_val_0)s")
        query_id = f"{prefix}-{i}"
        result = client.query(sql, parameters={"hogql_val_0": query["flag"]}, settings={"query_id": query_id},
                              column_oriented=True)
        columns = [[rounded(v) for v in column] for column in result.result_columns]
        out.append({
            "name": query["name"],
            "column_names": list(result.column_names),
            "rows": sorted(map(list, zip(*columns)), key=repr) if columns else [],
            "query_id": result.query_id,
            "summary_keys": sorted(result.summary.keys()),
        })
    print(json.dumps(out, default=str, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
