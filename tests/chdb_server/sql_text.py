"""The little SQL lexing the HTTP layer needs before handing a query to chdb.

ClickHouse's HTTP handler learns from its parser where an `INSERT ... FORMAT x` statement
ends and its data begins, which output format a query asks for, and whether the text holds
more than one statement. chdb only takes whole statements, so these are recovered here with
a tokenizer that knows ClickHouse's quoting and comment rules (strings, quoted identifiers,
heredocs, `--`, `#`, nested `/* */`). It never needs to understand the grammar itself.

Callers pass the request bytes decoded as latin-1: one character per byte keeps every offset
a byte offset (ClickHouse reports positions in bytes), and no byte of a multi-byte UTF-8
character can be mistaken for a quote or a bracket.
"""

import re
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

WORD = "word"
STRING = "string"
QUOTED_ID = "quoted_id"
PUNCT = "punct"

_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_NUMBER_RE = re.compile(r"[0-9][0-9A-Za-z_.]*")
_HEREDOC_RE = re.compile(r"\$([A-Za-z0-9_]*)\$")


@dataclass(frozen=True)
class Token:
    kind: str
    start: int
    end: int
    text: str

    def is_word(self, *words: str) -> bool:
        return self.kind == WORD and self.text.upper() in words

    @property
    def name(self) -> str:
        """The identifier this token denotes: a bare word, or a quoted one without quotes."""
        if self.kind == QUOTED_ID:
            return self.text[1:-1]
        return self.text


class UnterminatedToken(ValueError):
    """A string, quoted identifier or comment runs to the end of the text."""


def _skip_quoted(sql: str, pos: int, quote: str) -> int:
    """End of a quoted token starting at pos; backslash escapes and doubled quotes inside."""
    i = pos + 1
    while i < len(sql):
        c = sql[i]
        if c == "\\":
            i += 2
        elif c == quote:
            if i + 1 < len(sql) and sql[i + 1] == quote:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise UnterminatedToken(pos)


def _skip_block_comment(sql: str, pos: int) -> int:
    """End of a /* */ comment starting at pos; ClickHouse lets these nest."""
    depth, i = 0, pos
    while i < len(sql):
        pair = sql[i:i + 2]
        if pair == "/*":
            depth, i = depth + 1, i + 2
        elif pair == "*/":
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    raise UnterminatedToken(pos)


def _skip_insignificant(sql: str, pos: int) -> int:
    """Skips whitespace and comments from pos."""
    while pos < len(sql):
        c = sql[pos]
        if c.isspace():
            pos += 1
        elif sql.startswith("--", pos) or sql.startswith("#!", pos) or sql.startswith("# ", pos):
            newline = sql.find("\n", pos)
            pos = len(sql) if newline < 0 else newline + 1
        elif sql.startswith("/*", pos):
            pos = _skip_block_comment(sql, pos)
        else:
            break
    return pos


def tokens(sql: str, start: int = 0) -> Iterator[Token]:
    """Significant tokens of sql from start on. Raises UnterminatedToken lazily."""
    pos = _skip_insignificant(sql, start)
    while pos < len(sql):
        c = sql[pos]
        if c == "'":
            kind, end = STRING, _skip_quoted(sql, pos, c)
        elif c in "\"`":
            kind, end = QUOTED_ID, _skip_quoted(sql, pos, c)
        elif c == "$" and (heredoc := _HEREDOC_RE.match(sql, pos)):
            closing = sql.find(heredoc.group(0), heredoc.end())
            if closing < 0:
                raise UnterminatedToken(pos)
            kind, end = STRING, closing + len(heredoc.group(0))
        elif match := _WORD_RE.match(sql, pos):
            kind, end = WORD, match.end()
        elif match := _NUMBER_RE.match(sql, pos):
            kind, end = WORD, match.end()
        else:
            kind, end = PUNCT, pos + 1
        yield Token(kind, pos, end, sql[pos:end])
        pos = _skip_insignificant(sql, end)


def top_level(sql: str, start: int = 0) -> Iterator[Token]:
    """Tokens of sql that are outside any brackets."""
    depth = 0
    for token in tokens(sql, start):
        if token.kind == PUNCT and token.text in "([{":
            depth += 1
        elif token.kind == PUNCT and token.text in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0:
            yield token


def _format_clause(sql: str, output_formats: set) -> Optional[Token]:
    """The name token of the last top-level `FORMAT <name>` whose name is a known format.

    Checking the name against the engine's list keeps `SELECT format FROM t` (a column
    named format) from being taken for a FORMAT clause."""
    found, previous = None, None
    for token in top_level(sql):
        if previous is not None and previous.is_word("FORMAT") and token.kind in (WORD, QUOTED_ID):
            if token.name.lower() in output_formats:
                found = token
        previous = token
    return found


def output_format(sql: str, output_formats: set) -> Optional[str]:
    """The format named by the query's own FORMAT clause, as written, or None."""
    try:
        token = _format_clause(sql, output_formats)
    except UnterminatedToken:
        return None
    return token.name if token else None


@dataclass(frozen=True)
class InsertWithData:
    """`INSERT ... FORMAT <format>` followed by its data."""
    statement: str      # the INSERT without the FORMAT clause, as chdb's send_insert wants it
    format: str
    data_offset: int    # where the data starts in the text


def split_insert(sql: str) -> Optional[InsertWithData]:
    """Recognises an INSERT that carries its data after a FORMAT clause.

    `INSERT ... VALUES (...)` and `INSERT ... SELECT` are whole statements and give None.
    Like ClickHouse's ParserInsertQuery, the data starts right after the format name,
    past spaces and tabs and then past one line break, if there is one."""
    try:
        stream = top_level(sql)
        first = next(stream, None)
        if first is None or not first.is_word("INSERT"):
            return None
        previous = first
        for token in stream:
            if token.is_word("VALUES", "SELECT", "WITH"):
                return None
            if previous.is_word("FORMAT") and token.kind in (WORD, QUOTED_ID):
                return InsertWithData(sql[:previous.start], token.name, _data_start(sql, token.end))
            previous = token
    except UnterminatedToken:
        return None
    return None


def _data_start(sql: str, pos: int) -> int:
    while pos < len(sql) and sql[pos] in " \t\f":
        pos += 1
    if sql.startswith("\r", pos):
        pos += 1
    if sql.startswith("\n", pos):
        pos += 1
    return pos


def is_empty(sql: str) -> bool:
    """True when the text has no statement: only whitespace, comments or semicolons first.

    ClickHouse answers such a query with `Empty query` (SYNTAX_ERROR)."""
    try:
        first = next(tokens(sql), None)
    except UnterminatedToken:
        return False
    return first is None or first.text == ";"


def second_statement(sql: str) -> Optional[int]:
    """Offset of the `;` that ends the first statement when another statement follows it.

    The HTTP interface refuses multi-statement queries; chdb would run them all."""
    try:
        stream = top_level(sql)
        for token in stream:
            if token.text == ";":
                rest = [t for t in stream if t.text != ";"]
                return token.start if rest else None
    except UnterminatedToken:
        return None
    return None


def first_word(sql: str) -> str:
    try:
        token = next(tokens(sql), None)
    except UnterminatedToken:
        return ""
    return token.text.upper() if token and token.kind == WORD else ""


def line_and_column(sql: str, offset: int) -> Tuple[int, int]:
    """1-based line and column of an offset, as ClickHouse's syntax errors name them."""
    return sql.count("\n", 0, offset) + 1, offset - (sql.rfind("\n", 0, offset) + 1) + 1
