"""ClickHouse exceptions as the HTTP interface reports them.

The status mapping is ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/
exceptionCodeToHTTPStatus.cpp), keyed by error name instead of number. Any code not
listed there answers 500.
"""

import re
from dataclasses import dataclass

_STATUS_BY_NAME = {
    "REQUIRED_PASSWORD": 401,
    **dict.fromkeys((
        "UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE",
        "ACCESS_DENIED",
    ), 403),
    **dict.fromkeys((
        "BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT", "CANNOT_PARSE_ESCAPE_SEQUENCE",
        "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE", "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER",
        "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING", "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6",
        "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN",
        "UNKNOWN_ELEMENT_IN_AST", "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST",
        "TOO_BIG_AST", "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    ), 400),
    **dict.fromkeys((
        "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE", "UNKNOWN_STORAGE",
        "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING", "UNKNOWN_AGGREGATE_FUNCTION",
        "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE", "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE",
    ), 404),
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503,
    "HTTP_LENGTH_REQUIRED": 411,
    "TIMEOUT_EXCEEDED": 408,
    "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

# chdb nests the text of an exception into the exceptions that carry it further, e.g.
# "Code: 73. DB::Exception: Code: 73. DB::Exception: Unknown format Foo. (UNKNOWN_FORMAT)
# (version 26.9.2.1). (UNKNOWN_FORMAT)", and prefixes streaming failures with
# "Streaming query failed: ". The innermost "Code: N. DB::Exception: " starts the message.
_CODE_RE = re.compile(r"Code: (\d+)\. DB::Exception: ")
_NAME_RE = re.compile(r"\. \(([A-Z][A-Z0-9_]*)\)")
_SUFFIX_CHAIN_RE = re.compile(r"(?:\. \([A-Z][A-Z0-9_]*\)(?: \(version [^()]*(?:\([^()]*\))?\))?)+\s*")


@dataclass
class ClickHouseError(Exception):
    code: int
    name: str
    message: str

    @property
    def http_status(self) -> int:
        return _STATUS_BY_NAME.get(self.name, 500)

    def text(self, version: str) -> str:
        """The exception as ClickHouse's HTTP interface writes it (without the final newline)."""
        return f"Code: {self.code}. DB::Exception: {self.message}. ({self.name}) (version {version})"


def parse_engine_error(text: str) -> ClickHouseError:
    """Recovers code, name and ClickHouse's own message from a chdb exception text."""
    matches = list(_CODE_RE.finditer(text))
    if not matches:
        return ClickHouseError(1001, "STD_EXCEPTION", text.strip())
    last = matches[-1]
    rest = text[last.end():]
    # The message ends where only ". (NAME) (version ...)" suffixes follow.
    for name in _NAME_RE.finditer(rest):
        if _SUFFIX_CHAIN_RE.fullmatch(rest, name.start()):
            return ClickHouseError(int(last.group(1)), name.group(1), rest[:name.start()])
    return ClickHouseError(int(last.group(1)), "UNKNOWN_EXCEPTION", rest.strip())
