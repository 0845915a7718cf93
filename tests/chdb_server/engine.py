"""The embedded ClickHouse (chdb) behind the HTTP server: connections, sessions, cancelling.

One process hosts one chdb engine bound to one data directory. Connections to it are cheap
(well under a millisecond once the engine is up) and each keeps its own session state
(SET, USE, temporary tables), so every HTTP request gets a fresh connection, and a
ClickHouse HTTP session (`session_id`) keeps one connection for its lifetime.
"""

import json
import os
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import chdb

from errors import ClickHouseError, parse_engine_error

# Raised by chdb for statements it cannot stream (SHOW, DESCRIBE, EXPLAIN, KILL, DDL, ...).
_NOT_STREAMABLE = "Streaming query is not supported"
SESSION_NOT_FOUND = 372
SESSION_IS_LOCKED = 373


def engine_errors(function):
    """Turns the exceptions chdb raises into ClickHouseError."""
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (RuntimeError, chdb.ChdbError) as error:
            raise parse_engine_error(str(error)) from None
    return wrapper


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def escape_parameter(value: str) -> str:
    """Query parameter values are read in the escaped (TabSeparated) format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


@dataclass
class Statistics:
    """What a query did, for X-ClickHouse-Summary (ClickHouse's Progress, written verbatim)."""
    read_rows: int = 0
    read_bytes: int = 0
    written_rows: int = 0
    written_bytes: int = 0
    total_rows_to_read: int = 0
    result_rows: int = 0
    result_bytes: int = 0
    _chunks_read_rows: int = 0
    _chunks_read_bytes: int = 0

    def take_progress(self, progress: dict) -> None:
        """chdb's progress callback reports running totals of the query (at its end at least)."""
        for name in ("read_rows", "read_bytes", "total_rows_to_read", "written_rows", "written_bytes"):
            setattr(self, name, max(getattr(self, name), progress.get(name, 0)))

    def take_chunk(self, chunk) -> None:
        """A chunk of streamed result: its rows and in-memory bytes, and (as chdb reports it
        for a result chunk) what was read from storage since the previous chunk."""
        self.result_rows += chunk.rows_read()
        self.result_bytes += chunk.bytes_read()
        self._chunks_read_rows += chunk.storage_rows_read()
        self._chunks_read_bytes += chunk.storage_bytes_read()
        self.read_rows = max(self.read_rows, self._chunks_read_rows)
        self.read_bytes = max(self.read_bytes, self._chunks_read_bytes)


class EngineConnection:
    """One chdb connection. It runs one statement at a time.

    Queries go through the connection's native handle (`_conn`): the public Connection
    post-processes some format names (DataFrame, ArrowTable) and its StreamingResult stops
    at the first chunk without rows, which drops the text a format writes for an empty
    result (JSON's "meta", CSVWithNames' header)."""

    def __init__(self, path: str):
        self._connection = chdb.connect(path)
        self._native = self._connection._conn
        self.statistics = Statistics()
        self._connection.set_progress_callback(lambda progress: self.statistics.take_progress(progress))

    def reset_statistics(self) -> Statistics:
        """Starts counting anew; the object returned keeps what was counted until the next reset."""
        self.statistics = Statistics()
        return self.statistics

    @engine_errors
    def run(self, sql: str, output_format: str = "TabSeparated", params: Optional[dict] = None) -> bytes:
        """Runs a statement and returns its whole output."""
        try:
            result = self._native.query(sql, output_format, params=params or {})
        except (RuntimeError, chdb.ChdbError):
            self._drain()
            raise
        statistics = self.statistics
        statistics.written_rows = max(statistics.written_rows, result.rows_written())
        statistics.written_bytes = max(statistics.written_bytes, result.bytes_written())
        # As for a streamed chunk: rows_read() is the result's rows, storage_rows_read() what was read.
        statistics.result_rows = max(statistics.result_rows, result.rows_read())
        statistics.result_bytes = max(statistics.result_bytes, result.bytes_read())
        statistics.read_rows = max(statistics.read_rows, result.storage_rows_read())
        statistics.read_bytes = max(statistics.read_bytes, result.storage_bytes_read())
        return result.bytes()

    def _drain(self) -> None:
        """chdb keeps the output a failed query wrote before its error (a JSON document cut
        short, say) and hands it out at the front of the connection's next result; a query
        into the Null format takes it."""
        with suppress(RuntimeError, chdb.ChdbError):
            self._native.query("SELECT 1", "Null")

    @engine_errors
    def stream(self, sql: str, output_format: str, params: dict) -> Optional["ResultStream"]:
        """Starts a streaming query, or returns None for a statement chdb cannot stream."""
        try:
            return ResultStream(self._native, self._native.send_query(sql, output_format, params=params),
                                self.statistics)
        except RuntimeError as error:
            if _NOT_STREAMABLE in str(error):
                return None
            raise

    @engine_errors
    def insert(self, statement: str, data_format: str, chunks: Iterator[bytes]) -> None:
        """Streams the data of an `INSERT ... FORMAT` into the table."""
        inserter = self._connection.send_insert(statement, data_format)
        try:
            for chunk in chunks:
                inserter.append(chunk)
        except BaseException:
            with suppress(RuntimeError):
                inserter.cancel()
            raise
        result = inserter.finish()
        self.statistics.written_rows = result.rows_written
        self.statistics.written_bytes = result.bytes_written

    def statement_class(self, sql: str) -> str:
        """READ_ONLY, MUTATING, CONTROL or UNKNOWN, as chdb's parser classifies the text."""
        return self._native.classify_query(sql)["query_class"].name

    def settings_values(self, names) -> Dict[str, str]:
        """Current values of the settings among names that exist."""
        if not names:
            return {}
        listed = ", ".join(quote_string(name) for name in names)
        rows = self.run(f"SELECT name, value FROM system.settings WHERE name IN ({listed})", "JSONCompactEachRow")
        return dict(json.loads(line) for line in rows.decode().splitlines())

    def apply_settings(self, settings: Dict[str, str]) -> None:
        """SET each setting. The engine parses the values (strings, like URL parameters) and
        rejects unknown names with UNKNOWN_SETTING, exactly as for the HTTP interface."""
        if settings:
            assignments = ", ".join(f"{quote_identifier(k)} = {quote_string(v)}" for k, v in settings.items())
            self.run(f"SET {assignments}")

    def setting_values(self, names) -> List[str]:
        """The current values of settings, as text (getSetting: much cheaper than system.settings)."""
        if not names:
            return []
        values = ", ".join(f"toString(getSetting({quote_string(name)}))" for name in names)
        # JSONCompactEachRow: one line even with extremes=1 on the connection.
        return json.loads(self.run(f"SELECT {values}", "JSONCompactEachRow").decode().split("\n", 1)[0])

    def current_database(self) -> str:
        # The first line: with extremes=1 on the connection, extremes follow it.
        return self.run("SELECT currentDatabase()", "TabSeparatedRaw").decode().split("\n", 1)[0]

    def use_database(self, database: str) -> None:
        self.run(f"USE {quote_identifier(database)}")

    def close(self) -> None:
        self._connection.close()


class ResultStream:
    """The output of a streaming query, chunk by chunk as the engine produces it."""

    def __init__(self, native, handle, statistics: Statistics):
        self._native = native
        self._handle = handle
        self._statistics = statistics
        self._finished = False

    def chunks(self) -> Iterator[bytes]:
        while not self._finished:
            chunk = self._fetch()
            data = b"" if chunk is None else chunk.bytes()
            if not data and (chunk is None or chunk.rows_read() == 0):
                self._finished = True
                return
            self._statistics.take_chunk(chunk)
            yield data

    @engine_errors
    def _fetch(self):
        try:
            return self._native.streaming_fetch_result(self._handle)
        except BaseException:
            self._finished = True  # the query failed: nothing to cancel
            raise

    def cancel(self) -> None:
        """Stops the query. Only prompt while no fetch is running on another thread."""
        if not self._finished:
            self._finished = True
            self._native.streaming_cancel_query(self._handle)


class Engine:
    """The engine of this process, and facts about it the HTTP layer needs."""

    def __init__(self, data_dir: str):
        self.path = os.path.abspath(data_dir)
        os.makedirs(self.path, exist_ok=True)
        # Keeps the engine up while request connections come and go, and runs KILL QUERY.
        self._admin = EngineConnection(self.path)
        self._admin_lock = threading.Lock()
        self.version = self._admin_query("SELECT version()").strip()
        formats = self._admin_query("SELECT name, content_type FROM system.formats WHERE is_output")
        # Format names are case-insensitive in ClickHouse.
        self.output_formats: Dict[str, Tuple[str, str]] = {
            name.lower(): (name, content_type)
            for name, content_type in (line.split("\t", 1) for line in formats.splitlines())
        }
        self._error_names: Dict[int, str] = {}
        self._setting_defaults: Dict[Tuple[str, ...], Tuple[List[str], List[str]]] = {}

    def _admin_query(self, sql: str, params: Optional[dict] = None) -> str:
        with self._admin_lock:
            return self._admin.run(sql, "TabSeparatedRaw", params).decode()

    def connect(self) -> EngineConnection:
        return EngineConnection(self.path)

    def content_type(self, format_name: str) -> str:
        known = self.output_formats.get(format_name.lower())
        return known[1] if known else "text/plain; charset=UTF-8"

    def error(self, code: int, message: str) -> ClickHouseError:
        """An exception the HTTP layer raises itself, named as the engine names the code."""
        if code not in self._error_names:
            self._error_names[code] = self._admin_query(f"SELECT errorCodeToName({int(code)})").strip()
        return ClickHouseError(code, self._error_names[code], message)

    def changed_settings(self, connection: EngineConnection, settings: Tuple[str, ...]) -> List[str]:
        """Which of the settings named (a name ending in "_" stands for all that start with it)
        differ on the connection from their defaults (the values of the admin connection,
        which never changes any)."""
        if settings not in self._setting_defaults:
            conditions = " OR ".join(f"startsWith(name, {quote_string(name)})" if name.endswith("_")
                                     else f"name = {quote_string(name)}" for name in settings)
            with self._admin_lock:
                names = self._admin.run(f"SELECT name FROM system.settings WHERE {conditions} ORDER BY name",
                                        "TabSeparatedRaw").decode().split()
                self._setting_defaults[settings] = names, self._admin.setting_values(names)
        names, defaults = self._setting_defaults[settings]
        return [name for name, value, default in zip(names, connection.setting_values(names), defaults)
                if value != default]

    def kill(self, log_comment: str) -> None:
        """KILL QUERY (asynchronously) for the queries running with this log_comment.

        system.processes shows a query reformatted, with its parameters substituted, so the
        request's text cannot find it; a log_comment unique to the request can."""
        self._admin_query("KILL QUERY WHERE Settings['log_comment'] = {c:String} ASYNC",
                          {"c": escape_parameter(log_comment)})

    def kill_all(self) -> None:
        self._admin_query("KILL QUERY WHERE query_id != queryID() ASYNC")

    def close(self) -> None:
        self._admin.close()


@dataclass
class Session:
    """A ClickHouse HTTP session: one connection, used by one request at a time."""
    key: Tuple[str, str]
    connection: EngineConnection
    timeout: float
    expires: float = 0.0
    busy: bool = False


class SessionStore:
    """Named sessions by (user, session_id), closed after `session_timeout` idle seconds."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._lock = threading.Lock()
        self._sessions: Dict[Tuple[str, str], Session] = {}

    def acquire(self, user: str, session_id: str, timeout: float, must_exist: bool) -> Session:
        with self._lock:
            self._close_expired()
            session = self._sessions.get((user, session_id))
            if session is None:
                if must_exist:
                    raise self._engine.error(SESSION_NOT_FOUND, f"Session {session_id} not found")
                session = Session((user, session_id), self._engine.connect(), timeout)
                self._sessions[session.key] = session
            elif session.busy:
                raise self._engine.error(SESSION_IS_LOCKED, f"Session {session_id} is locked by a concurrent client")
            session.busy = True
            session.timeout = timeout
            return session

    def release(self, session: Session, close: bool) -> None:
        with self._lock:
            session.busy = False
            session.expires = time.monotonic() + session.timeout
            if close:
                self._sessions.pop(session.key, None)
                session.connection.close()

    def _close_expired(self) -> None:
        now = time.monotonic()
        for key, session in list(self._sessions.items()):
            if not session.busy and session.expires <= now:
                del self._sessions[key]
                session.connection.close()

    def close_all(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.connection.close()
            self._sessions.clear()
