#!/usr/bin/env python3
"""A ClickHouse-HTTP-compatible server over chdb (ClickHouse's engine, in process).

It stands in for a real ClickHouse server in tests on machines that have none:

    server.py --data-dir DIR [--host 127.0.0.1] [--port 0] [--port-file FILE]
              [--request-log FILE] [--auth USER:PASSWORD] [--threads N]

The HTTP behaviour follows ClickHouse 26.9's HTTPHandler (src/Server/HTTPHandler.cpp and
src/Server/HTTP/*); see README.md beside this file for what is covered and what is not.
"""

import argparse
import base64
import binascii
import bz2
import itertools
import json
import lzma
import os
import random
import select
import signal
import socket
import ssl
import string
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Iterator, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

import formats
import sql_text
from engine import Engine, EngineConnection, Session, SessionStore, Statistics
from errors import ClickHouseError

try:
    import brotli
except ImportError:  # the decoders are optional: without them that Content-Encoding is refused
    brotli = None
try:
    import zstandard
except ImportError:
    zstandard = None
try:
    import lz4.frame as lz4_frame
except ImportError:
    lz4_frame = None

DEFAULT_MAX_QUERY_SIZE = 262144          # ClickHouse's max_query_size
DEFAULT_BUFFER_SIZE = 1 << 20            # DBMS_DEFAULT_BUFFER_SIZE
KEEP_ALIVE_SECONDS = 30                  # DEFAULT_HTTP_KEEP_ALIVE_TIMEOUT
KEEP_ALIVE = f"timeout={KEEP_ALIVE_SECONDS}, max=10000"
DEFAULT_SESSION_TIMEOUT = 60             # default_session_timeout
MAX_SESSION_TIMEOUT = 3600               # max_session_timeout
EXCEPTION_TAG_LENGTH = 16
DISPLAY_NAME = socket.gethostname()
EXPOSED_HEADERS = ("X-ClickHouse-Query-Id,X-ClickHouse-Summary,X-ClickHouse-Server-Display-Name,"
                   "X-ClickHouse-Format,X-ClickHouse-Timezone,X-ClickHouse-Exception-Code,X-ClickHouse-Exception-Tag")

# URL parameters the HTTP handler consumes itself (HTTPHandler.cpp's reserved_param_names and
# the `query` of the dynamic query handler). `param_*` are query parameters; every other
# parameter is a setting for this query.
RESERVED_PARAMS = {
    "query", "compress", "decompress", "user", "password", "quota_key", "query_id", "stacktrace", "role",
    "buffer_size", "wait_end_of_query", "session_id", "session_timeout", "session_check",
    "client_protocol_version", "close_session", "database", "default_format",
}

NOT_FOUND_TEXT = (
    "There is no handle {uri}\n\n"
    "Use / or /ping for health checks.\n"
    "Or /replicas_status for more sophisticated health checks.\n\n"
    "Send queries from your program with POST method or GET /?query=...\n\n"
    "Use clickhouse-client:\n\n"
    "For interactive data analysis:\n"
    "    clickhouse-client\n\n"
    "For batch query processing:\n"
    "    clickhouse-client --query='SELECT 1' > result\n"
    "    clickhouse-client < query > result\n"
)

# Error codes this layer raises itself; their names come from the engine.
READONLY = 164
SYNTAX_ERROR = 62
BAD_ARGUMENTS = 36
UNKNOWN_FORMAT = 73
NOT_IMPLEMENTED = 48
CANNOT_DECOMPRESS = 271
AUTHENTICATION_FAILED = 516
HTTP_LENGTH_REQUIRED = 381
INVALID_SESSION_TIMEOUT = 374


def is_true(value: str) -> bool:
    """A boolean setting given as text (URL parameters are text)."""
    return value.strip().lower() in ("1", "true")


class ClientGone(Exception):
    """The client closed the connection (or stopped reading or sending)."""


class ServerStopping(Exception):
    """A request came in while the server shuts down."""


# ---------------------------------------------------------------------------------------------
# Request body


def _decoder(content_encoding: str, engine: Engine):
    """A callable that decodes the request body incrementally, or None for a plain body. Names as
    ClickHouse's chooseCompressionMethod takes them: exactly "", "none" or "auto" for none, else a
    method name or alias in any case; anything else ("identity", "x-gzip") is refused."""
    hint = content_encoding.strip()
    name = hint.lower()
    gzip = lambda: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress  # noqa: E731
    br = brotli and (lambda: brotli.Decompressor().process)
    xz = lambda: lzma.LZMADecompressor().decompress  # noqa: E731
    zstd = zstandard and (lambda: zstandard.ZstdDecompressor().decompressobj().decompress)
    factories = {
        "gzip": gzip, "gz": gzip,
        "deflate": lambda: zlib.decompressobj().decompress,  # zlib format, as ClickHouse's "deflate"
        "xz": xz, "lzma": xz,
        "bz2": lambda: bz2.BZ2Decompressor().decompress,
        "br": br, "brotli": br,
        "zstd": zstd, "zst": zstd,
        "lz4": lz4_frame and (lambda: lz4_frame.LZ4FrameDecompressor().decompress),
    }
    if hint in ("", "none", "auto"):
        return None
    if name not in factories:
        raise engine.error(BAD_ARGUMENTS, f"Unknown compression method '{content_encoding}'. Only 'auto', 'none', "
                           "'gzip', 'deflate', 'br', 'xz', 'zstd', 'lz4', 'bz2', 'snappy' are supported as "
                           "compression methods")
    if not factories[name]:
        raise engine.error(NOT_IMPLEMENTED, f"Content-Encoding {name} needs a Python module that is not installed")
    return factories[name]()


class BodyReader:
    """The request body, de-chunked and decoded, read piece by piece as the query needs it."""

    def __init__(self, handler: BaseHTTPRequestHandler, engine: Engine):
        headers = handler.headers
        self._rfile = handler.rfile
        self._engine = engine
        self._encoding = headers.get("Content-Encoding", "")
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._remaining = 0 if self._chunked else int(headers.get("Content-Length") or 0)
        self._chunk_left = 0
        self._done = not self._chunked and self._remaining == 0
        self._decode = None
        self._pending = b""

    def start_decoding(self) -> None:
        """Checks Content-Encoding; done once the query runs, where ClickHouse does it."""
        self._decode = _decoder(self._encoding, self._engine)

    def _read_raw(self, size: int) -> bytes:
        if self._done:
            return b""
        try:
            if not self._chunked:
                data = self._rfile.read(min(size, self._remaining))
                self._remaining -= len(data)
                self._done = self._remaining == 0
            else:
                data = self._read_chunk(size)
        except OSError as error:
            raise ClientGone(str(error)) from None
        if not data and not self._done:
            raise ClientGone("request body ended early")
        return data

    def _read_chunk(self, size: int) -> bytes:
        if self._chunk_left == 0:
            line = self._rfile.readline(65537)
            try:
                self._chunk_left = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ClientGone("bad chunk header") from None
            if self._chunk_left == 0:
                while self._rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields
                self._done = True
                return b""
        data = self._rfile.read(min(size, self._chunk_left))
        self._chunk_left -= len(data)
        if data and self._chunk_left == 0:
            self._rfile.readline()  # the CRLF closing the chunk
        return data

    def read_some(self) -> bytes:
        """The next piece of the decoded body; b"" at its end."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        while True:
            raw = self._read_raw(1 << 20)
            if not raw or not self._decode:
                return raw
            try:
                data = self._decode(raw)
            except Exception as error:  # each decoder has its own exception type
                raise self._engine.error(CANNOT_DECOMPRESS, f"Cannot decode request body "
                                         f"({self._encoding}): {error}") from None
            if data:
                return data

    def read_upto(self, limit: int) -> bytes:
        parts, size = [], 0
        while size < limit:
            data = self.read_some()
            if not data:
                break
            if size + len(data) > limit:
                data, self._pending = data[:limit - size], data[limit - size:]
            parts.append(data)
            size += len(data)
        return b"".join(parts)

    def rest(self) -> Iterator[bytes]:
        while data := self.read_some():
            yield data

    def drain(self) -> None:
        """Reads what is left so the connection can carry the next request."""
        while self._read_raw(1 << 20):
            pass


# ---------------------------------------------------------------------------------------------
# Response


class Response:
    """The response to one request, sent the way ClickHouse's HTTP handler does.

    The output format flushes after every block, so each chunk of output goes out as the engine
    produces it: headers with the first one, and an error after that can only be appended.
    `buffer_size` above 1 MiB holds back that many bytes first; with wait_end_of_query=1 all
    of it is kept (spilling to disk) and sent with a Content-Length."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self._handler = handler
        self._head_only = handler.command == "HEAD"
        self._chunked = handler.request_version == "HTTP/1.1"
        self.status = 200
        self.headers: Dict[str, str] = {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Server-Display-Name": DISPLAY_NAME,
        }
        # ClickHouse 25.11+ sends a random tag on every response and frames an exception that
        # comes after the data started with it.
        self.exception_tag = "".join(random.choices(string.ascii_lowercase, k=EXCEPTION_TAG_LENGTH))
        self.statistics = Statistics()
        self.started = time.monotonic()
        self.headers_sent = False
        self.bytes_sent = 0
        self.exception_code: Optional[int] = None
        self._buffer = bytearray()
        self._buffer_limit = 0
        self._spool = None
        self._gzip = None
        self._gzip_level = 3

    def hold_until_end(self) -> None:
        self._spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)

    def hold_back(self, size: int) -> None:
        self._buffer_limit = size

    def compress(self, level: int) -> None:
        self._gzip_level = level
        self._gzip = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self.headers["Content-Encoding"] = "gzip"

    def write(self, data: bytes) -> None:
        if self._gzip:
            # A sync flush per block keeps a slow result streaming, compressed or not.
            data = self._gzip.compress(data) + self._gzip.flush(zlib.Z_SYNC_FLUSH)
        if self._spool is not None:
            self._spool.write(data)
            return
        self._buffer += data
        if len(self._buffer) > self._buffer_limit:
            self._flush()

    def finish(self) -> None:
        if self._gzip:
            tail, self._gzip = self._gzip.flush(), None
            if self._spool is not None:
                self._spool.write(tail)
            else:
                self._buffer += tail
        if self._spool is not None:
            self._send_spooled()
            return
        self._flush()
        if self._chunked and not self._head_only:
            self._send(b"0\r\n\r\n")

    def send_text(self, status: int, content_type: str, text: str) -> None:
        """A fixed answer (/ping, not found)."""
        self.status = status
        self.headers["Content-Type"] = content_type
        self.write(text.encode())
        self.finish()

    def fail(self, error: ClickHouseError, version: str) -> None:
        """Sends an exception: as the whole response if nothing was sent yet, else framed at
        the end of the data already sent, after which the connection is cut without the
        closing chunk so the client cannot take the response for complete."""
        message = (error.text(version) + "\n").encode()
        self.exception_code = error.code
        if not self.headers_sent:
            self._buffer.clear()
            self._spool = None
            self.status = error.http_status
            self.headers["X-ClickHouse-Exception-Code"] = str(error.code)
            self.headers["Content-Type"] = "text/plain; charset=UTF-8"
            self.headers.pop("X-ClickHouse-Format", None)
            if self._gzip:
                self.compress(self._gzip_level)
            self.write(message)
            self.finish()
            return
        tag = self.exception_tag.encode()
        block = (b"\r\n__exception__\r\n" + tag + b"\r\n" + message
                 + str(len(message)).encode() + b" " + tag + b"\r\n__exception__\r\n")
        if self._gzip:
            block = self._gzip.compress(block) + self._gzip.flush(zlib.Z_SYNC_FLUSH)
        self._handler.close_connection = True
        self._send_body(block)

    def summary(self) -> str:
        """X-ClickHouse-Summary: the query's progress so far, numbers written as strings."""
        values = dict(vars(self.statistics))
        values["elapsed_ns"] = int((time.monotonic() - self.started) * 1e9)
        values["memory_usage"] = 0
        keys = ("read_rows", "read_bytes", "written_rows", "written_bytes", "total_rows_to_read",
                "result_rows", "result_bytes", "elapsed_ns", "memory_usage")
        return json.dumps({key: str(values[key]) for key in keys}, separators=(",", ":"))

    def _flush(self) -> None:
        if not self.headers_sent:
            self._send_headers(content_length=None)
        if self._buffer:
            self._send_body(bytes(self._buffer))
            self._buffer.clear()

    def _send_spooled(self) -> None:
        spool, self._spool = self._spool, None
        self._send_headers(content_length=spool.tell())
        spool.seek(0)
        while data := spool.read(1 << 20):
            self._send_body(data, framed=False)
        spool.close()

    def _send_headers(self, content_length: Optional[int]) -> None:
        handler = self._handler
        keep_alive = not handler.close_connection and (self._chunked or content_length is not None)
        handler.send_response_only(self.status)
        handler.send_header("Date", handler.date_time_string())
        handler.send_header("Connection", "Keep-Alive" if keep_alive else "Close")
        for name, value in self.headers.items():
            handler.send_header(name, value)
        if content_length is not None:
            handler.send_header("Content-Length", str(content_length))
        elif self._chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        if keep_alive:
            handler.send_header("Keep-Alive", KEEP_ALIVE)
        handler.send_header("X-ClickHouse-Exception-Tag", self.exception_tag)
        handler.send_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)
        handler.send_header("X-ClickHouse-Summary", self.summary())
        self.headers_sent = True
        try:
            handler.end_headers()
        except OSError as error:
            raise ClientGone(str(error)) from None

    def _send_body(self, data: bytes, framed: bool = True) -> None:
        if self._head_only or not data:
            return
        # One write per chunk: with TCP_NODELAY, a chunk is one segment train, not three.
        self._send(b"%x\r\n%b\r\n" % (len(data), data) if framed and self._chunked else data)
        self.bytes_sent += len(data)

    def _send(self, data: bytes) -> None:
        try:
            self._handler.wfile.write(data)
        except OSError as error:  # BrokenPipe, ConnectionReset, socket timeout
            raise ClientGone(str(error)) from None


# ---------------------------------------------------------------------------------------------
# Queries


def credentials(headers, params: Dict[str, str], engine: Engine, strict: bool) -> Tuple[str, str]:
    """User and password, from the places and with the rules of authenticateUserByHTTP.cpp.

    Two schemes at once (X-ClickHouse-User/Key, Authorization, user/password parameters) are
    always refused, as ClickHouse refuses them before it looks at any user. Its other refusals
    (an empty user name, an unsupported or malformed Authorization) only apply when strict:
    without --auth any single scheme with any user and password is accepted."""
    def refuse(message: str, always: bool = False) -> None:
        if strict or always:
            raise engine.error(AUTHENTICATION_FAILED, message)

    def mixed(first: str, second: str) -> None:
        refuse(f"Invalid authentication: it is not allowed to use {first} and {second} simultaneously", always=True)

    user, key = headers.get("X-ClickHouse-User", ""), headers.get("X-ClickHouse-Key", "")
    has_authorization = "Authorization" in headers  # Poco's hasCredentials(): even an empty one
    authorization = headers.get("Authorization", "")
    in_params = "user" in params or "password" in params
    if user or key:
        if not user:  # checked first: a mix without a user name gets this refusal
            refuse("Got an empty user name from X-ClickHouse HTTP headers", always=has_authorization or in_params)
        if has_authorization:
            mixed("X-ClickHouse HTTP headers", "Authorization HTTP header")
        if in_params:
            mixed("X-ClickHouse HTTP headers", "authentication via parameters")
        return user or "default", key
    if has_authorization:
        if in_params:
            mixed("Authorization HTTP header", "authentication via parameters")
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            refuse(f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported")
            return "default", ""
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            refuse("Invalid authentication: malformed Basic credentials")
            return "default", ""
        if not user:
            refuse("Got an empty user name from Authorization HTTP header")
        return user or "default", password
    user = params.get("user", "default")
    if not user:
        refuse("Got an empty user name from authentication via parameters")
    return user or "default", params.get("password", "")


class DisconnectWatcher:
    """Notices a client that closes its connection while its query computes without writing,
    as ClickHouse does for cancel_http_readonly_queries_on_client_close."""

    def __init__(self, sock: socket.socket, on_disconnect):
        self.fired = False
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(sock, on_disconnect), daemon=True).start()

    def _watch(self, sock: socket.socket, on_disconnect) -> None:
        while not self._stop.wait(0.05):
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                continue
            try:
                # socket.socket's own recv: on a TLS connection it peeks at the raw bytes, so a
                # client that sends close_notify before closing counts as sending data (tokio-rustls
                # does not send one when dropped).
                gone = socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""
            except OSError:
                gone = True
            if gone and not self._stop.is_set():
                self.fired = True
                try:
                    on_disconnect()
                except ClickHouseError as error:
                    print(f"chdb_server: cannot cancel the query: {error.message}", file=sys.stderr)
            return  # data to read is the next request: nothing more to learn

    def stop(self) -> None:
        self._stop.set()


class QueryRequest:
    """One request to the query handler: ClickHouse's HTTPHandler::processQuery over chdb."""

    def __init__(self, handler: "Handler", response: Response, record: dict):
        self.handler = handler
        self.server: "ChdbHTTPServer" = handler.server
        self.engine = self.server.engine
        self.response = response
        self.record = record
        self.headers = handler.headers
        pairs = parse_qsl(urlsplit(handler.path).query, keep_blank_values=True)
        # As ClickHouse: settings and query parameters apply in order (the last one holds); other
        # parameters are read with Poco's HTMLForm::get, which returns the first; database and
        # default_format take the first non-empty one, and their headers win over them.
        self.params = {}
        for name, value in pairs:
            self.params.setdefault(name, value)
        last = dict(pairs)
        self.settings = {name: value for name, value in last.items()
                         if name and name not in RESERVED_PARAMS and not name.startswith("param_")}
        self.query_params = {name[len("param_"):]: value for name, value in last.items()
                             if name.startswith("param_")}
        first_non_empty = lambda wanted: next((v for n, v in pairs if n == wanted and v), "")  # noqa: E731
        self.query_id = self.params.get("query_id") or self.headers.get("X-ClickHouse-Query-Id") or str(uuid.uuid4())
        self.database = self.headers.get("X-ClickHouse-Database") or first_non_empty("database")
        self.default_format = (self.headers.get("X-ClickHouse-Format") or first_non_empty("default_format")
                               or "TabSeparated")
        self.body = BodyReader(handler, self.engine)
        self.user = ""
        self.connection: Optional[EngineConnection] = None
        self.session: Optional[Session] = None
        # Marks the query in system.processes, so that it can be killed from another connection.
        # A log_comment of the client's own is kept (and then marks all its queries that have it).
        self.marker = self.settings.get("log_comment") or f"chdb_server:{self.query_id}:{uuid.uuid4()}"
        record.update(query_id=self.query_id, settings=self.settings, session_id=self.params.get("session_id"))

    def serve(self) -> None:
        try:
            try:
                self._serve()
            finally:
                self.body.drain()
        except ClickHouseError as error:
            self.response.fail(error, self.engine.version)

    def _serve(self) -> None:
        self._check_request()
        strict = self.server.auth is not None
        self.user, password = credentials(self.headers, self.params, self.engine, strict)
        self.record["user"] = self.user
        self.server.authenticate(self.user, password)
        with self.server.query_slots:
            self._open_connection()
            try:
                self._execute()
            finally:
                self._close_connection()
        # Like HTTPHandler, the session is free again before the last bytes go out: a client
        # that has the whole response can use the session at once.
        self.response.finish()

    def _check_request(self) -> None:
        if self.handler.command == "POST" and "Content-Length" not in self.headers \
                and "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            self.handler.close_connection = True  # where this request ends is unknown
            raise self.engine.error(HTTP_LENGTH_REQUIRED, "The Transfer-Encoding is not chunked and there is no "
                                    "Content-Length header for POST request")
        for unsupported in ("compress", "decompress"):
            if is_true(self.params.get(unsupported, "0")):
                raise self.engine.error(NOT_IMPLEMENTED, f"chdb_server does not implement {unsupported}=1 "
                                        "(ClickHouse's native compression); use HTTP compression instead")
        if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
            raise self.engine.error(NOT_IMPLEMENTED, "chdb_server does not implement external data "
                                    "(multipart/form-data)")

    def _open_connection(self) -> None:
        session_id = self.params.get("session_id")
        if session_id:
            self.session = self.server.sessions.acquire(
                self.user, session_id, self._session_timeout(), self.params.get("session_check") == "1")
            self.connection = self.session.connection
        else:
            self.connection = self.engine.connect()

    def _close_connection(self) -> None:
        if self.session:
            self.server.sessions.release(self.session, close=is_true(self.params.get("close_session", "0")))
        else:
            self.connection.close()

    def _session_timeout(self) -> float:
        text = self.params.get("session_timeout")
        if text is None:
            return DEFAULT_SESSION_TIMEOUT
        if not text.isdigit():
            raise self.engine.error(INVALID_SESSION_TIMEOUT, f"Invalid session timeout: '{text}'")
        if int(text) > MAX_SESSION_TIMEOUT:
            raise self.engine.error(INVALID_SESSION_TIMEOUT, f"Session timeout '{text}' is larger than "
                                    f"max_session_timeout: {MAX_SESSION_TIMEOUT}. Maximum session timeout could be "
                                    "modified in configuration file.")
        return int(text)

    def _execute(self) -> None:
        """Settings and database hold for this query only, also inside a session (ClickHouse
        applies URL settings to a copy of the session's context), so a session gets its own
        values back afterwards."""
        connection = self.connection
        query_settings = {"log_comment": self.marker, **self.settings}
        saved_settings = connection.settings_values(list(query_settings)) if self.session else {}
        saved_database = connection.current_database() if self.session and self.database else None
        connection.apply_settings(query_settings)
        try:
            if self.database:
                connection.use_database(self.database)
            self._run_query()
        finally:
            if self.session:
                self._restore(saved_settings, saved_database)

    def _restore(self, saved_settings: Dict[str, str], saved_database: Optional[str]) -> None:
        try:
            self.connection.apply_settings(saved_settings)
            if saved_database:
                self.connection.use_database(saved_database)
        except ClickHouseError as error:  # e.g. readonly, which cannot be lowered again
            print(f"chdb_server: session {self.session.key[1]}: cannot restore: {error.message}", file=sys.stderr)

    def _run_query(self) -> None:
        # From here on ClickHouse is inside executeQuery: responses, errors included, name the query.
        self.response.headers["X-ClickHouse-Query-Id"] = self.query_id
        self.response.headers["X-ClickHouse-Timezone"] = self.settings.get("session_timezone") or "UTC"
        self._set_up_output()
        self.body.start_decoding()
        # The summary counts this query only, not the statements around it that set up the session.
        self.response.statistics = self.connection.reset_statistics()
        try:
            head, insert = self._read_query()
            if insert:
                self._run_insert(head, insert)
            else:
                self._run_statement(head)
        finally:
            self.connection.reset_statistics()

    def _set_up_output(self) -> None:
        if is_true(self.params.get("wait_end_of_query", self.settings.get("http_wait_end_of_query", "0"))):
            self.response.hold_until_end()
        buffer_size = int(self.params.get("buffer_size") or self.settings.get("http_response_buffer_size") or 0)
        if buffer_size > DEFAULT_BUFFER_SIZE:  # HTTPHandler only buffers in memory beyond its own buffer
            self.response.hold_back(buffer_size)
        accepted = {part.split(";")[0].strip().lower() for part in self.headers.get("Accept-Encoding", "").split(",")}
        if "gzip" in accepted and is_true(self.settings.get("enable_http_compression", "1")):
            self.response.compress(int(self.settings.get("http_zlib_compression_level", "3")))

    def _read_query(self) -> Tuple[bytes, Optional[sql_text.InsertWithData]]:
        """The query text: the `query` parameter, a line break, and the body; for an INSERT
        with data only up to its data, which is streamed separately."""
        query_param = self.params.get("query", "")
        head = (query_param + "\n").encode() if query_param else b""
        head += self.body.read_upto(int(self.settings.get("max_query_size", DEFAULT_MAX_QUERY_SIZE)))
        insert = sql_text.split_insert(head.decode("latin-1"))
        if insert is None:
            head += b"".join(self.body.rest())
        return head, insert

    def _check_statement(self, raw: bytes) -> None:
        text = raw.decode("latin-1")
        if sql_text.is_empty(text):
            raise self.engine.error(SYNTAX_ERROR, "Empty query")
        end_of_first = sql_text.second_statement(text)
        if end_of_first is not None:
            raise self._multi_statement_error(raw, end_of_first)
        if self.handler.command in ("GET", "HEAD") and self.connection.statement_class(text) == "MUTATING":
            raise self.engine.error(READONLY, f"{self.user}: Cannot execute query in readonly mode. For queries "
                                    "over HTTP, method GET implies readonly. You should use method POST for "
                                    "modifying queries")

    def _multi_statement_error(self, raw: bytes, offset: int) -> ClickHouseError:
        """The parser's refusal of a second statement (tryParseQuery in parseQuery.cpp)."""
        where = f"failed at position {offset + 1} (end of query)"
        text = raw.decode("latin-1")
        newline = text.find("\n")
        if 0 <= newline < len(text) - 1:
            where += " (line {}, col {})".format(*sql_text.line_and_column(text, offset))
        shown = raw[offset:].decode(errors="replace")
        shown = shown[:160] + ("... " if len(shown) > 160 else ". ")
        return self.engine.error(SYNTAX_ERROR, f"Syntax error (Multi-statements are not allowed): {where}: {shown}")

    def _run_insert(self, head: bytes, insert: sql_text.InsertWithData) -> None:
        statement = insert.statement.encode("latin-1").decode(errors="replace")
        self.record.update(query=statement, query_size=len(insert.statement))
        self._check_statement(insert.statement.encode("latin-1"))
        inline = head[insert.data_offset:]
        data = itertools.chain([inline] if inline else [], self.body.rest())
        self.connection.insert(statement, insert.format, self._count_insert_bytes(data))

    def _count_insert_bytes(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.record["insert_bytes"] += len(chunk)
            yield chunk

    def _run_statement(self, raw: bytes) -> None:
        text = raw.decode(errors="replace")
        self.record.update(query=text, query_size=len(raw))
        self._check_statement(raw)
        plan = None
        if self._produces_output(text):
            format_name = sql_text.output_format(text, self.engine.output_formats) or self.default_format
            if format_name.lower() not in self.engine.output_formats:  # chdb has Python-only "formats"
                raise self.engine.error(UNKNOWN_FORMAT, f"Unknown format {format_name}")
            self.response.headers["Content-Type"] = self.engine.content_type(format_name)
            self.response.headers["X-ClickHouse-Format"] = format_name
            plan = self._output_plan(format_name, text)
        stream = None
        if plan is None or plan.kind != formats.WHOLE:
            stream = self.connection.stream(text, self.default_format, self.query_params)
        with self._cancel_on_disconnect():
            if stream is None:  # a statement chdb does not stream, or a format that must be whole
                self._write_whole(self.connection.run(text, self.default_format, self.query_params))
                return
            try:
                chunks = stream.chunks()
                for data in formats.join(plan, chunks) if plan else chunks:
                    self.response.write(data)
            except formats.CannotStream:  # before any output: run it whole instead
                stream.cancel()
                self._write_whole(self.connection.run(text, self.default_format, self.query_params))
            finally:
                stream.cancel()  # the client left, or the output could not be joined; else a no-op

    def _write_whole(self, data: bytes) -> None:
        """A whole output, in pieces of ClickHouse's buffer size: no copies of all of it."""
        view = memoryview(data)
        for start in range(0, len(view), DEFAULT_BUFFER_SIZE):
            self.response.write(view[start:start + DEFAULT_BUFFER_SIZE])
        if not data:
            self.response.write(b"")

    def _output_plan(self, format_name: str, text: str) -> formats.Plan:
        """How the result reaches the client as one document (formats.py): WHOLE when a setting
        or WITH TOTALS may give the streamed chunks a shape the plan does not expect."""
        plan = formats.plan_for(format_name)
        if plan.kind == formats.WHOLE:
            return plan
        lowered = text.lower()
        if any(word in lowered for word in formats.guard_words(plan)):
            return formats.WHOLE_PLAN
        settings = formats.guard_settings(plan)
        if settings:
            changed = self.engine.changed_settings(self.connection, settings)
            self.response.statistics = self.connection.reset_statistics()  # not this query's reading
            if changed:
                return formats.WHOLE_PLAN
        return plan

    @contextmanager
    def _cancel_on_disconnect(self):
        """With cancel_http_readonly_queries_on_client_close, a client that leaves while the
        query computes gets it killed; the query's error then means the client is gone."""
        watcher = self._watch_disconnect()
        try:
            yield
        except ClickHouseError:
            if watcher and watcher.fired:
                raise ClientGone("client closed the connection; query killed") from None
            raise
        finally:
            if watcher:
                watcher.stop()

    def _produces_output(self, text: str) -> bool:
        """Whether ClickHouse would answer with a result in a format (a pulling pipeline)."""
        return self.connection.statement_class(text) == "READ_ONLY" or sql_text.first_word(text) == "KILL"

    def _watch_disconnect(self) -> Optional[DisconnectWatcher]:
        readonly = self.handler.command in ("GET", "HEAD") or self.settings.get("readonly", "0") not in ("", "0")
        if not (readonly and is_true(self.settings.get("cancel_http_readonly_queries_on_client_close", "0"))):
            return None
        return DisconnectWatcher(self.handler.connection, lambda: self.engine.kill(self.marker))


# ---------------------------------------------------------------------------------------------
# HTTP server


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = KEEP_ALIVE_SECONDS
    server: "ChdbHTTPServer"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_HEAD = do_GET

    def log_message(self, format: str, *args) -> None:
        """Only errors reach stderr; requests go to the request log."""

    def log_error(self, format: str, *args) -> None:
        if not format.startswith("Request timed out"):  # an idle keep-alive connection closing
            print(f"chdb_server: {self.address_string()}: {format % args}", file=sys.stderr)

    def _route(self) -> str:
        """The handler ClickHouse's default HTTP handlers pick (HTTPHandlerFactory.cpp)."""
        uri, method = self.path, self.command
        path = uri.split("?", 1)[0]
        query_uri = uri.startswith(("?", "/?", "/query?"))
        if method in ("GET", "HEAD"):
            if uri in ("/", "") or path == "/ping" or path.startswith("/replicas_status"):
                return "ok"
            if query_uri:
                return "query"
        elif method == "POST" and (query_uri or uri in ("/", "")):
            return "query"
        return "not_found"

    def _dispatch(self) -> None:
        try:
            with self.server.serving():
                self._serve()
        except ServerStopping:
            self.close_connection = True

    def _serve(self) -> None:
        split = urlsplit(self.path)
        record = {
            "start": time.time(), "method": self.command, "path": split.path, "query_string": split.query,
            "headers": [[name, value] for name, value in self.headers.items()], "user": None, "query_id": None,
            "session_id": None, "settings": {}, "query": None, "query_size": 0, "insert_bytes": 0,
            "cancelled": False,
        }
        response = Response(self)
        try:
            route = self._route()
            if route == "query":
                QueryRequest(self, response, record).serve()
            elif route == "ok":
                response.send_text(200, "text/html; charset=UTF-8", "Ok.\n")
            else:
                response.send_text(404, "text/plain; charset=UTF-8", NOT_FOUND_TEXT.format(uri=self.path))
        except ClientGone:
            record["cancelled"] = True
            self.close_connection = True
        except Exception:  # a bug here must not take the server down
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not response.headers_sent:
                response.fail(ClickHouseError(1001, "STD_EXCEPTION", "chdb_server internal error"),
                              self.server.engine.version)
        finally:
            record.update(end=time.time(), status=response.status, exception_code=response.exception_code,
                          bytes_sent=response.bytes_sent)
            self.server.request_log.write(record)


class RequestLog:
    """One JSON line per request, for tests to check what reached the upstream."""

    def __init__(self, path: Optional[str]):
        self._file = open(path, "a", encoding="utf-8") if path else None
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if self._file:
            with self._lock:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


class ChdbHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog. socketserver's default is 5: a burst of new connections (a proxy
    # opening 48 at once when 64 clients arrive) overflowed it, and the connects dropped in
    # the meantime waited out TCP's retransmission (1 s, 3 s, ...) while queries held the
    # interpreter. ClickHouse listens with a backlog of 4096 (listen_backlog).
    request_queue_size = 4096

    def __init__(self, address, engine: Engine, request_log: RequestLog, auth: Optional[Tuple[str, str]],
                 threads: int, tls: Optional[ssl.SSLContext] = None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.tls = tls
        self.engine = engine
        self.sessions = SessionStore(engine)
        self.request_log = request_log
        self.auth = auth
        self.query_slots = threading.BoundedSemaphore(threads)
        self._requests = threading.Condition()
        self._active_requests = 0
        self._stopping = False

    @contextmanager
    def serving(self):
        """Counts the requests being served, so that shutdown can wait for them."""
        with self._requests:
            if self._stopping:
                raise ServerStopping()
            self._active_requests += 1
        try:
            yield
        finally:
            with self._requests:
                self._active_requests -= 1
                self._requests.notify_all()

    def finish_requests(self, timeout: float) -> bool:
        """Refuses new requests, cancels the running queries and waits for their requests.
        The engine must not be closed under a query: chdb crashes the process then."""
        with self._requests:
            self._stopping = True
        self.engine.kill_all()
        with self._requests:
            return self._requests.wait_for(lambda: self._active_requests == 0, timeout)

    def get_request(self):
        """With TLS, the handshake happens on the connection's first read, in its own thread."""
        connection, address = super().get_request()
        if self.tls is not None:
            connection = self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def authenticate(self, user: str, password: str) -> None:
        """Without --auth anyone is let in, like ClickHouse's default user without password."""
        if self.auth and (user, password) != self.auth:
            raise self.engine.error(AUTHENTICATION_FAILED, f"{user}: Authentication failed: password is incorrect, "
                                    "or there is no user with such name")

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            return  # the client went away: ClickHouse does not log that either
        if isinstance(error, ssl.SSLError):
            print(f"chdb_server: TLS with {client_address} failed: {error.reason}", file=sys.stderr)
            return
        print(f"chdb_server: error serving {client_address}:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)


def write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="chdb database directory (created if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="written with the port once listening")
    parser.add_argument("--request-log", help="appended with one JSON line per request")
    parser.add_argument("--auth", help="USER:PASSWORD required of every query (default: anyone)")
    parser.add_argument("--threads", type=int, default=64, help="queries executed at the same time (default 64)")
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS instead of HTTP (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    if args.auth is not None and ":" not in args.auth:
        parser.error("--auth must be USER:PASSWORD")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    return args


def watch_parent(parent: int, stop, interval: float = 0.5) -> None:
    """Calls stop() once the process that started this one is gone, which shows as another
    parent process id (whoever adopted it): test harnesses keep the server in a static that
    is never dropped, and it must not outlive them. A parent that is init (1) never goes."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        print(f"chdb_server: parent process {parent} is gone; stopping", file=sys.stderr, flush=True)
        stop()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv=None) -> int:
    parent = os.getppid()  # before the engine starts, which takes a while
    args = parse_args(argv)
    engine = Engine(args.data_dir)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    request_log = RequestLog(args.request_log)
    tls = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    server = ChdbHTTPServer((args.host, args.port), engine, request_log, auth, args.threads, tls)
    port = server.server_address[1]
    if args.port_file:
        write_atomically(args.port_file, f"{port}\n")
    print(f"listening on {'https' if tls else 'http'}://{args.host}:{port}", flush=True)

    def stop(signum=None, frame=None):
        # shutdown() waits for serve_forever() to return, which runs on this very thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    watch_parent(parent, stop)  # a parent gone already is noticed at once
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if not server.finish_requests(timeout=10):
            print("chdb_server: requests still running; exiting without closing the engine", file=sys.stderr)
            os._exit(1)
        server.sessions.close_all()
        request_log.close()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
