"""Tests of the ClickHouse-HTTP-compatible chdb server and of the PostHog data generator.

Run from the repository root: .venv/bin/python -m pytest tests/chdb_server -q
"""

import base64
import gzip
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from pathlib import Path

import pytest

import sql_text

HERE = Path(__file__).resolve().parent
SERVER = HERE / "server.py"
GENERATOR = HERE.parent / "data" / "generate.py"
VERSION_RE = r"\(version 26\.9\.\d+\.\d+\)"


class RunningServer:
    def __init__(self, tmp_path: Path, *extra_args: str):
        self.port_file = tmp_path / "port"
        self.log_file = tmp_path / "requests.jsonl"
        self.stderr_file = tmp_path / "stderr.txt"
        with open(self.stderr_file, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(SERVER), "--data-dir", str(tmp_path / "data"), "--port-file", str(self.port_file),
                 "--request-log", str(self.log_file), *extra_args],
                stdout=subprocess.PIPE, stderr=stderr, text=True)
        deadline = time.monotonic() + 30
        while not self.port_file.exists():
            assert self.process.poll() is None, self.stderr_file.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        assert self.process.stdout.readline().strip() == f"listening on {self.url}"

    def request(self, method: str, target: str, body=None, headers=None, **params):
        """One request on a new connection: (status, headers, body)."""
        if params:
            target += ("&" if "?" in target else "?") + urllib.parse.urlencode(params)
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, target, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def query(self, sql: str, method: str = "POST", headers=None, **params):
        if method == "GET":
            return self.request("GET", "/", headers=headers, query=sql, **params)
        return self.request("POST", "/", body=sql.encode(), headers=headers, **params)

    def ok(self, sql: str, **params) -> str:
        status, _, body = self.query(sql, **params)
        assert status == 200, body
        return body.decode()

    def records(self) -> list:
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    def record(self, query_id: str, timeout: float = 10) -> dict:
        """The request log record of a query, waiting for the request to end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records() if r["query_id"] == query_id]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no request log record for {query_id}")

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=15)
        finally:
            self.process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = RunningServer(tmp_path_factory.mktemp("chdb_server"))
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    running = RunningServer(tmp_path_factory.mktemp("chdb_server_auth"), "--auth", "alice:s3cret")
    yield running
    assert running.stop() == 0


def assert_error(response, status: int, code: int, name: str, message_part: str = ""):
    got_status, headers, body = response
    text = body.decode()
    assert got_status == status, text
    assert headers["X-ClickHouse-Exception-Code"] == str(code)
    assert re.fullmatch(rf"Code: {code}\. DB::Exception: .*\. \({name}\) {VERSION_RE}\n", text, re.S), text
    assert message_part in text


def raw_http(port: int, request: bytes) -> bytes:
    """Sends a request on a plain socket and returns everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        parts = []
        while data := sock.recv(1 << 20):
            parts.append(data)
    return b"".join(parts)


def http_chunks(body: bytes):
    """The chunks of a chunked body, and whether the closing zero-size chunk came."""
    chunks, pos = [], 0
    while pos < len(body):
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end], 16)
        if size == 0:
            return chunks, True
        chunks.append(body[end + 2:end + 2 + size])
        pos = end + 2 + size + 2
    return chunks, False


def dechunk(body: bytes):
    """The payload of a chunked body, and whether the closing zero-size chunk came."""
    chunks, complete = http_chunks(body)
    return b"".join(chunks), complete


# --- SQL text helpers ---------------------------------------------------------------------


def test_split_insert_finds_the_data_after_the_format_name():
    text = "INSERT INTO t (a, `b`) SETTINGS async_insert = 0 FORMAT CSV \r\n1,'x'\n"
    insert = sql_text.split_insert(text)
    assert (insert.statement, insert.format, text[insert.data_offset:]) == (
        "INSERT INTO t (a, `b`) SETTINGS async_insert = 0 ", "CSV", "1,'x'\n")
    assert sql_text.split_insert("insert into t format TSV").data_offset == len("insert into t format TSV")
    for whole_statement in ("INSERT INTO t VALUES (1)", "INSERT INTO t SELECT 1 FORMAT CSV", "SELECT 1 FORMAT CSV",
                            "INSERT INTO t /* FORMAT CSV */ VALUES ('FORMAT CSV')"):
        assert sql_text.split_insert(whole_statement) is None


def test_output_format_and_statement_boundaries():
    formats = {"json", "csv", "tabseparated"}
    assert sql_text.output_format("SELECT 1 FORMAT JSON SETTINGS max_threads = 1", formats) == "JSON"
    assert sql_text.output_format("SELECT format FROM t", formats) is None
    assert sql_text.output_format("SELECT (SELECT 1 FORMAT CSV) -- FORMAT JSON", formats) is None
    assert sql_text.output_format("SELECT 'FORMAT JSON'", formats) is None
    assert sql_text.second_statement("SELECT ';'; SELECT 2") == 10
    assert sql_text.second_statement("SELECT 1;; -- done\n") is None
    assert sql_text.is_empty(" /* nothing /* nested */ */ -- here\n")
    assert not sql_text.is_empty("SELECT 1")


# --- Handlers and responses ----------------------------------------------------------------


def test_health_endpoints_and_unknown_paths(server):
    for target in ("/ping", "/", "/replicas_status"):
        status, _, body = server.request("GET", target)
        assert (status, body) == (200, b"Ok.\n")
    status, _, body = server.request("GET", "/nowhere?x=1")
    assert status == 404
    assert body.decode().startswith("There is no handle /nowhere?x=1\n\nUse / or /ping for health checks.")


def test_select_answers_with_clickhouse_headers(server):
    status, headers, body = server.query("SELECT 1", method="GET")
    assert (status, body) == (200, b"1\n")
    assert headers["Content-Type"] == "text/tab-separated-values; charset=UTF-8"
    assert headers["X-ClickHouse-Format"] == "TabSeparated"
    assert headers["X-ClickHouse-Timezone"] == "UTC"
    assert headers["Transfer-Encoding"] == "chunked"
    assert headers["Keep-Alive"].startswith("timeout=")
    assert headers["X-ClickHouse-Server-Display-Name"]
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["X-ClickHouse-Query-Id"])
    assert re.fullmatch(r"[a-z]{16}", headers["X-ClickHouse-Exception-Tag"])
    summary = json.loads(headers["X-ClickHouse-Summary"])
    assert list(summary)[:8] == ["read_rows", "read_bytes", "written_rows", "written_bytes", "total_rows_to_read",
                                 "result_rows", "result_bytes", "elapsed_ns"]
    assert all(isinstance(value, str) for value in summary.values())
    assert summary["read_rows"] == "1" and summary["result_rows"] == "1"


@pytest.mark.parametrize("params, headers, sql, content_type, format_name, body_start", [
    ({"default_format": "JSON"}, {}, "SELECT 1 AS x", "application/json; charset=UTF-8", "JSON", b"{\n"),
    ({}, {"X-ClickHouse-Format": "CSVWithNames"}, "SELECT 1 AS x", "text/csv; charset=UTF-8; header=present",
     "CSVWithNames", b'"x"\n1\n'),
    ({"default_format": "Native"}, {}, "SELECT 1 AS x", "application/octet-stream", "Native",
     b"\x01\x01\x01x\x05UInt8\x01"),
    ({}, {}, "SELECT 1 AS x FORMAT Pretty", "text/plain; charset=UTF-8", "Pretty", "   ┏".encode()),
    ({"default_format": "CSV"}, {}, "SELECT 1 AS x FORMAT JSONEachRow", "application/x-ndjson; charset=UTF-8",
     "JSONEachRow", b'{"x":1}\n'),
    ({}, {}, "SELECT 1 AS x FORMAT jsoncompact", "application/json; charset=UTF-8", "jsoncompact", b"{\n"),
])
def test_output_format_from_parameter_header_or_format_clause(server, params, headers, sql, content_type,
                                                              format_name, body_start):
    status, response_headers, body = server.query(sql, headers=headers, **params)
    assert status == 200, body
    assert response_headers["Content-Type"] == content_type
    assert response_headers["X-ClickHouse-Format"] == format_name
    assert body.startswith(body_start)


def test_empty_result_keeps_the_text_of_its_format(server):
    body = server.ok("SELECT number AS n FROM numbers(10) WHERE n > 100 FORMAT JSON")
    assert json.loads(body)["meta"] == [{"name": "n", "type": "UInt64"}]
    assert server.ok("SELECT number AS n FROM numbers(10) WHERE n > 100 FORMAT CSVWithNames") == '"n"\n'


def test_query_parameter_and_body_are_joined_by_a_line_break(server):
    status, _, body = server.request("POST", "/?query=SELECT", body=b"41 + 1")
    assert (status, body) == (200, b"42\n")


def test_query_parameters_settings_and_statements_without_output(server):
    assert server.ok("SELECT {x:UInt32} + 1, {s:String}", param_x="41", param_s="a\\tb") == "42\ta\\tb\n"
    assert server.ok("SELECT getSetting('max_threads'), getSetting('log_comment')", max_threads="1",
                     log_comment="mine") == "1\tmine\n"
    status, headers, body = server.query("CREATE TABLE IF NOT EXISTS plain (a Int32) ENGINE = Memory")
    assert (status, body) == (200, b"")
    assert headers["Content-Type"] == "text/plain; charset=UTF-8" and "X-ClickHouse-Format" not in headers


def test_unknown_setting_is_refused_before_the_query(server):
    response = server.query("SELECT 1", no_such_setting="1")
    assert_error(response, 404, 115, "UNKNOWN_SETTING", "Unknown setting 'no_such_setting'")
    assert "X-ClickHouse-Query-Id" not in response[1]


@pytest.mark.parametrize("method, sql, status, code, name, message", [
    ("POST", "SELECT nope", 404, 47, "UNKNOWN_IDENTIFIER", "Unknown expression identifier `nope`"),
    ("POST", "SELECT * FROM missing_table", 404, 60, "UNKNOWN_TABLE", "missing_table"),
    ("POST", "SELECT (1", 400, 62, "SYNTAX_ERROR", "Syntax error"),
    ("POST", "SELECT throwIf(1)", 500, 395, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO", "throwIf"),
    ("POST", "SELECT 1 FORMAT NoSuchFormat", 404, 73, "UNKNOWN_FORMAT", "NoSuchFormat"),
    ("POST", "SELECT 1; SELECT 2", 400, 62, "SYNTAX_ERROR",
     "Syntax error (Multi-statements are not allowed): failed at position 9 (end of query): ; SELECT 2. ."),
    ("POST", " -- nothing\n", 400, 62, "SYNTAX_ERROR", "DB::Exception: Empty query. (SYNTAX_ERROR)"),
    ("GET", "CREATE TABLE nope (a Int8) ENGINE = Memory", 500, 164, "READONLY",
     "For queries over HTTP, method GET implies readonly."),
])
def test_errors_carry_code_name_and_status(server, method, sql, status, code, name, message):
    response = server.query(sql, method=method)
    assert_error(response, status, code, name, message)
    assert response[1]["X-ClickHouse-Query-Id"]


def test_error_after_streaming_started_is_framed_and_cuts_the_connection(server):
    sql = urllib.parse.quote("SELECT number, throwIf(number = 2000000) FROM numbers(3000000)")
    answer = raw_http(server.port, f"GET /?query={sql} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    tag = re.search(rb"X-ClickHouse-Exception-Tag: ([a-z]+)", head).group(1)
    payload, complete = dechunk(body)
    assert not complete
    message = re.search(rb"\r\n__exception__\r\n" + tag + rb"\r\n(Code: 395\..*\n)(\d+) " + tag
                        + rb"\r\n__exception__\r\n$", payload, re.S)
    assert message and int(message.group(2)) == len(message.group(1))
    assert payload.startswith(b"0\t0\n1\t0\n")


def test_each_block_goes_out_as_the_engine_produces_it(server):
    sql = urllib.parse.quote("SELECT number, sleepEachRow(0.05) FROM numbers(40) SETTINGS max_block_size = 1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(f"GET /?query={sql} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while b"\r\n0\t0\n\r\n" not in received:
            received += sock.recv(65536)
        assert time.monotonic() - started < 1.5  # the first row, long before the last
        while not received.endswith(b"\r\n0\r\n\r\n"):
            received += sock.recv(65536)
        assert time.monotonic() - started >= 2 and b"\r\n39\t0\n\r\n" in received


def test_wait_end_of_query_buffers_and_sends_a_length(server):
    status, headers, body = server.query("SELECT number FROM numbers(300000)", wait_end_of_query="1")
    assert status == 200 and "Transfer-Encoding" not in headers
    assert int(headers["Content-Length"]) == len(body) and body.endswith(b"299999\n")
    assert json.loads(headers["X-ClickHouse-Summary"])["result_rows"] == "300000"
    late_error = server.query("SELECT number, throwIf(number = 2000000) FROM numbers(3000000)", wait_end_of_query="1")
    assert_error(late_error, 500, 395, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO")


def test_gzip_response_when_accepted(server):
    status, headers, body = server.query("SELECT number FROM numbers(1000)", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).endswith(b"999\n")
    _, headers, body = server.query("SELECT 1", headers={"Accept-Encoding": "gzip"}, enable_http_compression="0")
    assert "Content-Encoding" not in headers and body == b"1\n"


def test_keep_alive_carries_many_requests_errors_included(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for sql, status in (("SELECT 1", 200), ("SELECT nope", 404), ("SELECT 2", 200)):
            connection.request("POST", "/", body=sql.encode())
            response = connection.getresponse()
            assert response.status == status
            response.read()
        assert connection.sock is not None
    finally:
        connection.close()


# --- Output: one document per result, as ClickHouse sends it ----------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """What ClickHouse sends for a result: chdb run non-streamed renders it with one output
    format from start to end, as ClickHouse's HTTP handler does."""
    import chdb
    connection = chdb.connect(str(tmp_path_factory.mktemp("reference")))
    yield connection._conn
    connection.close()


def reference_output(reference, sql: str, format_name: str, settings: dict):
    """(exception code or None, output)."""
    if settings:
        reference.query("SET " + ", ".join(f"{name} = '{value}'" for name, value in settings.items()), "TSV")
    try:
        return None, reference.query(sql, format_name, params={}).bytes()
    except RuntimeError as error:
        reference.query("SELECT 1", "Null")  # takes what the failed query left behind (engine.py's _drain)
        return int(re.search(r"Code: (\d+)", str(error)).group(1)), b""
    finally:
        if settings:
            reference.query("SET " + ", ".join(f"{name} = DEFAULT" for name in settings), "TSV")


def comparable(format_name: str, data: bytes) -> bytes:
    """The output without what differs between two runs of the same query: timings, and the
    sync marker of an Avro file, which avro-cpp draws from a generator seeded with the current
    second. Every Avro block ends with that marker, so the file's last 16 bytes are it."""
    if format_name == "Avro" and len(data) >= 16:
        data = data.replace(data[-16:], bytes(16))
    return re.sub(rb'("elapsed": |<elapsed>|"elapsed_ns":")[0-9.e-]+', rb"\1", data)


def mismatches(server, reference, sql: str, format_names, **settings) -> list:
    """The formats whose response differs from ClickHouse's output of the same result."""
    found = []
    for format_name in format_names:
        code, expected = reference_output(reference, sql, format_name, settings)
        status, headers, body = server.query(sql, default_format=format_name, **settings)
        if code is not None:
            if headers.get("X-ClickHouse-Exception-Code") != str(code):
                found.append((format_name, f"expected error {code}", status, body[:200]))
        elif status != 200 or comparable(format_name, body) != comparable(format_name, expected):
            found.append((format_name, status, len(body), len(expected), body[:200], expected[:200]))
    return found


# Three blocks. Pretty formats squash blocks that come within 50 ms of each other: not here, so
# that the reference does not depend on timing.
MULTI_BLOCK = ("SELECT number AS n, toString(number) AS s FROM numbers(2500) "
               "SETTINGS max_block_size = 1000, output_format_pretty_squash_consecutive_ms = 0")
HEADER_FORMATS = ["TSVWithNames", "TSVWithNamesAndTypes", "TSVRawWithNames", "CSVWithNames", "CSVWithNamesAndTypes",
                  "CustomSeparatedWithNames", "JSONCompactEachRowWithNamesAndTypes", "RowBinaryWithNamesAndTypes",
                  "Markdown", "Values", "JSONEachRow", "CustomSeparated"]


def test_every_output_format_sends_one_document(server, reference):
    names = reference.query("SELECT name FROM system.formats WHERE is_output ORDER BY name", "TSV").bytes().split()
    assert len(names) > 90
    assert mismatches(server, reference, MULTI_BLOCK, [name.decode() for name in names]) == []


@pytest.mark.parametrize("sql, settings", [
    ("SELECT number % 5 AS k, count() AS c FROM numbers(20) GROUP BY k WITH TOTALS ORDER BY k "
     "SETTINGS max_block_size = 2", {}),
    (MULTI_BLOCK, {"extremes": "1"}),
    (MULTI_BLOCK, {"output_format_json_array_of_rows": "1"}),
    (MULTI_BLOCK, {"format_custom_result_before_delimiter": "<", "format_custom_row_between_delimiter": ";"}),
    (MULTI_BLOCK, {"output_format_binary_encode_types_in_binary_format": "1"}),
    ("SELECT number AS `a\\nb`, 'x\"y\\nz' AS `c,d\"e` FROM numbers(7) SETTINGS max_block_size = 2", {}),
    ("SELECT number AS n FROM numbers(10) WHERE n > 100", {}),
])
def test_settings_that_reshape_a_format_still_give_one_document(server, reference, sql, settings):
    assert mismatches(server, reference, sql, HEADER_FORMATS, **settings) == []


def test_a_big_result_streams_as_one_document_with_its_row_count(server):
    sql = "SELECT number FROM numbers(300000) UNION ALL SELECT number FROM numbers(3)"
    target = "/?" + urllib.parse.urlencode({"query": sql, "default_format": "TSVWithNamesAndTypes"})
    head, _, body = raw_http(server.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                             .encode()).partition(b"\r\n\r\n")
    chunks, complete = http_chunks(body)
    assert complete and len(chunks) > 1  # still streamed block by block
    lines = b"".join(chunks).split(b"\n")
    assert lines[:2] == [b"number", b"UInt64"] and lines[-1] == b"" and len(lines) == 300006
    assert sorted(map(int, lines[2:-1])) == sorted([*range(300000), 0, 1, 2])

    status, headers, body = server.query(sql, default_format="JSON")
    document = json.loads(body)  # one document, not one per block
    assert status == 200 and document["rows"] == len(document["data"]) == 300003
    assert document["statistics"]["rows_read"] == 300003
    assert json.loads(headers["X-ClickHouse-Summary"])["result_rows"] == "300003"

    for format_name, header in (("CSVWithNames", b'"number"\n'), ("JSONCompactEachRowWithNames", b'["number"]\n')):
        status, headers, body = server.query(sql, default_format=format_name, wait_end_of_query="1")
        assert body.startswith(header) and body.count(header) == 1 and body.count(b"\n") == 300004
        assert json.loads(headers["X-ClickHouse-Summary"])["result_rows"] == "300003"


def test_an_error_in_a_result_run_whole_is_the_response_and_the_session_goes_on(server):
    # ClickHouse would have sent the rows before the error (README: What it does not do).
    session = {"session_id": "cut-short"}
    response = server.query("SELECT number, throwIf(number = 150000) FROM numbers(300000) SETTINGS max_block_size = "
                            "1000 FORMAT JSON", **session)
    assert_error(response, 500, 395, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO")
    assert server.ok("SELECT 1", **session) == "1\n"


# --- INSERT ---------------------------------------------------------------------------------


def encoders():
    import brotli
    import lz4.frame
    import zstandard
    return {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
            "zstd": zstandard.ZstdCompressor().compress, "lz4": lz4.frame.compress}


def test_insert_streams_data_given_in_all_the_ways(server):
    server.ok("CREATE TABLE inserts (a UInt32, b String) ENGINE = MergeTree ORDER BY a")
    status, headers, _ = server.request("POST", "/", body=b"1,one\n2,two\n", query="INSERT INTO inserts FORMAT CSV")
    assert status == 200
    assert json.loads(headers["X-ClickHouse-Summary"])["written_rows"] == "2"
    server.ok("INSERT INTO inserts FORMAT TabSeparated\n3\tthree\n")
    server.request("POST", "/", body=b"(4, 'four'), (5, 'five')", query="INSERT INTO inserts VALUES")
    for number, (encoding, encode) in enumerate(encoders().items(), start=6):
        status, _, body = server.request("POST", "/", body=encode(f"{number}\t{encoding}\n".encode()),
                                         headers={"Content-Encoding": encoding},
                                         query="INSERT INTO inserts FORMAT TSV")
        assert status == 200, body
    chunked = iter([b'{"a": 20, "b": "chu', b'nked"}\n{"a": 21, "b": "x"}\n'])
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/?query=" + urllib.parse.quote("INSERT INTO inserts FORMAT JSONEachRow"),
                       body=chunked, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.headers["X-ClickHouse-Summary"])["written_rows"] == "2"
    connection.close()
    assert server.ok("SELECT count(), groupArray(b) FROM (SELECT b FROM inserts ORDER BY a)") == (
        "12\t['one','two','three','four','five','gzip','deflate','br','zstd','lz4','chunked','x']\n")


def test_bad_insert_data_and_bad_encoding(server):
    server.ok("CREATE TABLE IF NOT EXISTS strict (a UInt32) ENGINE = Memory")
    response = server.request("POST", "/", body=b"not a number\n", query="INSERT INTO strict FORMAT TSV")
    assert_error(response, 400, 27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED")
    response = server.request("POST", "/", body=b"garbage", headers={"Content-Encoding": "gzip"},
                              query="INSERT INTO strict FORMAT TSV")
    assert response[0] == 500 and b"Cannot decode request body" in response[2]


# --- Identity, databases, sessions, authentication ------------------------------------------


def test_query_id_is_echoed_from_parameter_or_header(server):
    assert server.query("SELECT 1", query_id="my-id-1")[1]["X-ClickHouse-Query-Id"] == "my-id-1"
    _, headers, _ = server.query("SELECT 1", headers={"X-ClickHouse-Query-Id": "my-id-2"})
    assert headers["X-ClickHouse-Query-Id"] == "my-id-2"


def test_database_from_parameter_or_header(server):
    server.ok("CREATE DATABASE IF NOT EXISTS other")
    server.ok("CREATE TABLE IF NOT EXISTS other.things (a Int8) ENGINE = Memory")
    assert server.ok("SELECT currentDatabase(), count() FROM things", database="other") == "other\t0\n"
    status, _, body = server.query("SELECT currentDatabase()", headers={"X-ClickHouse-Database": "other"})
    assert body == b"other\n"
    assert_error(server.query("SELECT 1", database="missing"), 404, 81, "UNKNOWN_DATABASE")


def test_sessions_keep_state_and_lock(server):
    session = {"session_id": "s1", "session_timeout": "30"}
    server.ok("SET max_threads = 1", **session)
    server.ok("CREATE TEMPORARY TABLE tmp (a Int8)", **session)
    server.ok("INSERT INTO tmp VALUES (7)", **session)
    assert server.ok("SELECT getSetting('max_threads'), sum(a) FROM tmp", **session) == "1\t7\n"
    # URL settings hold for one query only, in a session too.
    assert server.ok("SELECT getSetting('max_block_size')", max_block_size="100", **session) == "100\n"
    assert server.ok("SELECT getSetting('max_block_size')", **session) != "100\n"
    assert server.ok("SELECT getSetting('max_threads')") != "1\n"
    assert_error(server.query("SELECT 1", session_id="nobody", session_check="1"), 500, 372, "SESSION_NOT_FOUND")

    slow = threading.Thread(target=server.ok, args=("SELECT sleep(1.5)",), kwargs=session)
    slow.start()
    time.sleep(0.5)
    try:
        assert_error(server.query("SELECT 1", **session), 500, 373, "SESSION_IS_LOCKED",
                     "Session s1 is locked by a concurrent client")
    finally:
        slow.join()
    server.ok("SELECT 1", close_session="1", **session)
    assert_error(server.query("SELECT 1", session_check="1", **session), 500, 372, "SESSION_NOT_FOUND")


def test_without_auth_any_single_credential_scheme_passes(server):
    for query_id, headers, params, user in (
            ("by-headers", {"X-ClickHouse-User": "header-user", "X-ClickHouse-Key": "k"}, {}, "header-user"),
            ("by-basic", {"Authorization": "Basic dXNlcjpwYXNz"}, {}, "user"),
            ("by-params", {}, {"user": "u", "password": "p"}, "u"),
            ("by-nothing", {}, {}, "default")):
        assert server.query("SELECT 1", headers=headers, query_id=query_id, **params)[0] == 200
        assert server.record(query_id)["user"] == user


@pytest.mark.parametrize("headers, params, message", [
    ({"X-ClickHouse-User": "u", "X-ClickHouse-Key": "k", "Authorization": "Basic dXNlcjpwYXNz"}, {},
     "Invalid authentication: it is not allowed to use X-ClickHouse HTTP headers and Authorization HTTP header "
     "simultaneously"),
    ({"X-ClickHouse-User": "u"}, {"password": "p"},
     "Invalid authentication: it is not allowed to use X-ClickHouse HTTP headers and authentication via parameters "
     "simultaneously"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, {"user": "u"},
     "Invalid authentication: it is not allowed to use Authorization HTTP header and authentication via parameters "
     "simultaneously"),
    ({"X-ClickHouse-Key": "k"}, {"user": "u"}, "Got an empty user name from X-ClickHouse HTTP headers"),
])
def test_mixed_credential_schemes_are_refused_with_or_without_auth(server, auth_server, headers, params, message):
    for running in (server, auth_server):
        query_id = f"mixed-{uuid.uuid4()}"
        response = running.query("SELECT 1", headers=headers, query_id=query_id, **params)
        assert_error(response, 403, 516, "AUTHENTICATION_FAILED", f"DB::Exception: {message}. (AUTHENTICATION_FAILED)")
        assert running.record(query_id)["user"] is None


def test_authentication(auth_server):
    basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert auth_server.query("SELECT 1", headers={"Authorization": basic})[2] == b"1\n"
    assert auth_server.ok("SELECT 1", user="alice", password="s3cret") == "1\n"
    headers = {"X-ClickHouse-User": "alice", "X-ClickHouse-Key": "s3cret"}
    assert auth_server.query("SELECT 1", headers=headers)[0] == 200
    assert_error(auth_server.query("SELECT 1"), 403, 516, "AUTHENTICATION_FAILED",
                 "default: Authentication failed: password is incorrect, or there is no user with such name")
    assert_error(auth_server.query("SELECT 1", user="alice", password="wrong", query_id="wrong"), 403, 516,
                 "AUTHENTICATION_FAILED")
    assert_error(auth_server.query("SELECT 1", headers=headers, user="alice", query_id="mixed"), 403, 516,
                 "AUTHENTICATION_FAILED",
                 "not allowed to use X-ClickHouse HTTP headers and authentication via parameters simultaneously")
    assert (auth_server.record("wrong")["user"], auth_server.record("mixed")["user"]) == ("alice", None)


# --- Cancellation and the request log --------------------------------------------------------


def test_client_disconnect_cancels_a_streaming_query(server):
    sql = urllib.parse.quote("SELECT number FROM numbers(100000000000)")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"GET /?query={sql}&query_id=cancel-stream HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = 0
        while received < 4 << 20:
            received += len(sock.recv(1 << 20))
    record = server.record("cancel-stream", timeout=5)
    assert record["cancelled"] and record["bytes_sent"] > 1 << 20
    assert server.ok("SELECT count() FROM system.processes WHERE query LIKE '%numbers(100000000000)%' "
                     "AND query NOT LIKE '%system.processes%'") == "0\n"


def test_client_disconnect_cancels_a_computing_readonly_query_when_asked(server):
    sql = urllib.parse.quote("SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 7 = 1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"GET /?query={sql}&query_id=cancel-compute&cancel_http_readonly_queries_on_client_close=1 "
                     "HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.5)
    record = server.record("cancel-compute")
    assert record["cancelled"] and record["end"] - record["start"] < 5


def test_request_log_shows_what_reached_the_server(server):
    status, _, _ = server.request("POST", "/?query_id=logged&max_threads=2&user=bob&password=pw&param_x=1",
                                  body=b"SELECT {x:UInt8}", headers={"X-Trace": "abc"})
    assert status == 200
    record = server.record("logged")
    assert record["method"] == "POST" and record["path"] == "/"
    assert record["query_string"] == "query_id=logged&max_threads=2&user=bob&password=pw&param_x=1"
    assert ["X-Trace", "abc"] in record["headers"]
    assert (record["user"], record["settings"], record["query"]) == ("bob", {"max_threads": "2"}, "SELECT {x:UInt8}")
    assert record["query_size"] == len("SELECT {x:UInt8}") and record["status"] == 200
    assert record["cancelled"] is False and record["bytes_sent"] == 2 and record["end"] >= record["start"]


# --- Lifetime ---------------------------------------------------------------------------------

# Starts the server from a short-lived parent and reports how the server ended. It makes itself
# a child subreaper, so that the orphaned server becomes its child and its exit status can be had.
LAUNCHER = r"""
import ctypes, json, os, subprocess, sys, time
server, data_dir, port_file, stderr_file = sys.argv[1:]
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
parent = os.fork()
if parent == 0:
    with open(stderr_file, "w") as stderr:
        process = subprocess.Popen([sys.executable, server, "--data-dir", data_dir, "--port-file", port_file],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 30
    while not os.path.exists(port_file) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    print(process.pid, flush=True)
    os._exit(0)  # the parent goes, the server stays
os.waitpid(parent, 0)
gone = time.monotonic()
pid, status = os.wait()  # the server, adopted
print(json.dumps({"pid": pid, "exit_code": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - gone}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs prctl(PR_SET_CHILD_SUBREAPER)")
def test_server_stops_when_the_process_that_started_it_is_gone(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(SERVER), str(tmp_path / "data"),
                                 str(tmp_path / "port"), str(tmp_path / "stderr.txt")],
                                stdout=subprocess.PIPE, text=True)
    server_pid = int(launcher.stdout.readline())
    try:
        rest, _ = launcher.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # the server did not stop: clean up after it
        os.kill(server_pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()
        pytest.fail("the server outlived its parent")
    outcome = json.loads(rest)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert outcome and outcome["pid"] == server_pid and outcome["exit_code"] == 0, stderr
    assert outcome["seconds"] < 5 and re.search(r"parent process \d+ is gone; stopping", stderr), stderr
    assert (tmp_path / "port").exists() and "Traceback" not in stderr


# --- Clients and data -----------------------------------------------------------------------


def test_clickhouse_connect_round_trip(server):
    import clickhouse_connect
    client = clickhouse_connect.get_client(host="127.0.0.1", port=server.port)
    client.command("CREATE TABLE cc (id UInt32, name String, at DateTime64(6, 'UTC')) ENGINE = MergeTree ORDER BY id")
    client.insert("cc", [[1, "a", "2026-10-01 00:00:00.000001"], [2, "b", "2026-10-02 00:00:00.5"]],
                  column_names=["id", "name", "at"])
    result = client.query("SELECT id, name, toString(at) FROM cc WHERE id >= {min:UInt32} ORDER BY id",
                          parameters={"min": 1})
    assert result.result_rows == [(1, "a", "2026-10-01 00:00:00.000001"), (2, "b", "2026-10-02 00:00:00.500000")]
    assert client.command("SELECT count() FROM cc") == 2
    client.close()


def generate(server, database: str, seed: int) -> dict:
    completed = subprocess.run(
        [sys.executable, str(GENERATOR), "--url", server.url, "--events", "10000", "--seed", str(seed),
         "--database", database, "--replace"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def checksum(server, database: str) -> str:
    return server.ok("SELECT (SELECT groupBitXor(cityHash64(*)) FROM events), "
                     "(SELECT groupBitXor(cityHash64(*)) FROM person_distinct_id_overrides)", database=database)


def test_generator_is_deterministic_and_shaped_like_posthog_data(server):
    summary = generate(server, "gen_a", seed=42)
    generate(server, "gen_b", seed=42)
    generate(server, "gen_c", seed=43)
    assert checksum(server, "gen_a") == checksum(server, "gen_b") != checksum(server, "gen_c")
    assert summary["rows"]["events"] == 10000 and int(summary["main_team"]["main_team_persons"]) == 250

    exposure = "event = '$feature_flag_called' AND JSONExtractString(properties, '$feature_flag') = 'test-experiment'"
    shares = server.ok(f"""
        SELECT countIf({exposure}) / count(), countIf({exposure} AND JSONExtractString(properties,
               '$feature_flag_response') NOT IN ('control', 'test')) / countIf({exposure}),
               uniqExact(uuid) = count(), uniqExact(person_id, timestamp) = count()
        FROM events WHERE team_id = 99999""", database="gen_a").split()
    assert 0.30 < float(shares[0]) < 0.38 and 0.003 < float(shares[1]) < 0.03 and shares[2:] == ["1", "1"]

    persons = server.ok(f"""
        SELECT count(), countIf(variants = 2), countIf(variants = 2 AND same_day)
        FROM (SELECT person_id, uniqExact(variant) AS variants, max(variants_that_day) > 1 AS same_day
              FROM (SELECT person_id, JSONExtractString(properties, '$feature_flag_response') AS variant,
                           uniqExact(variant) OVER (PARTITION BY person_id, toDate(timestamp)) AS variants_that_day
                    FROM events WHERE team_id = 99999 AND {exposure} AND variant IN ('control', 'test'))
              GROUP BY person_id)""", database="gen_a").split()
    assert persons[0] == "200" and int(persons[1]) >= 4 and 0 < int(persons[2]) < int(persons[1])

    overrides = server.ok("""
        SELECT uniqExact(distinct_id), countIf(is_deleted = 1), max(version), countIf(team_id = 2)
        FROM person_distinct_id_overrides""", database="gen_a").split()
    assert int(overrides[0]) > 10 and int(overrides[1]) > 0 and overrides[2] == "3" and int(overrides[3]) > 0
