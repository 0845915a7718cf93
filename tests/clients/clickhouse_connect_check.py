"""Runs a fixed session of clickhouse-connect calls against one ClickHouse HTTP URL and prints
what the library returned, as JSON. The Rust test runs it against the server directly and through
the proxy, and requires both outputs to be equal."""

import json
import sys
from urllib.parse import urlsplit

import clickhouse_connect


def main(url: str, table: str) -> None:
    parts = urlsplit(url)
    client = clickhouse_connect.get_client(host=parts.hostname, port=parts.port, username="default", password="")
    out = {"server_version": client.server_version}
    client.command(f"DROP TABLE IF EXISTS {table}")
    client.command(f"CREATE TABLE {table} (id UInt32, name String, score Float64) ENGINE = MergeTree ORDER BY id")
    client.insert(table, [[i, f"name-{i}", i / 7] for i in range(5000)], column_names=["id", "name", "score"])
    result = client.query(f"SELECT id, name, score FROM {table} WHERE id % 1000 = 0 ORDER BY id")
    out["rows"] = [list(r) for r in result.result_rows]
    out["column_types"] = [t.name for t in result.column_types]
    out["parameters"] = client.query("SELECT {n:UInt32} * 2 AS doubled, {s:String} AS s",
                                     parameters={"n": 21, "s": "é'\\"}).result_rows
    out["settings"] = client.query("SELECT getSetting('max_threads')", settings={"max_threads": 3}).result_rows
    total = 0
    with client.query_row_block_stream(f"SELECT id FROM {table}", settings={"max_block_size": 512}) as stream:
        for block in stream:
            total += len(block)
    out["streamed_rows"] = total
    out["count"] = client.command(f"SELECT count() FROM {table}")
    try:
        client.query("SELECT * FROM definitely_missing_table")
    except Exception as error:  # the library's error type carries ClickHouse's message
        out["error"] = "UNKNOWN_TABLE" in str(error)
    client.command(f"DROP TABLE {table}")
    print(json.dumps(out, default=str, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
