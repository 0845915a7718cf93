"""How a streamed result becomes the one document ClickHouse sends.

chdb's streaming API renders every block as a complete document of the output format: a
TSVWithNames chunk starts with the names again, a JSON chunk is a whole JSON object, a
Parquet chunk a whole file. ClickHouse's HTTP handler has one output format for the whole
result: its prefix (header) once, then the rows of every block, then its suffix. So each
format gets a plan, decided from what chdb produces for it (README.md has the table):

- CONCAT: the format has no prefix or suffix; the chunks are simply sent one after another.
- HEADER: a header (names, types) starts every chunk; it is sent with the first chunk and
  cut from the others. The Raw formats write names unescaped, so a name may hold a line
  break and the header more lines than expected: there the first chunk waits for the
  second, and if the line after the expected header is the same in both (a name going on,
  or blocks that start alike) the query runs WHOLE instead.
- VALUES: `Values` separates rows with a comma, also between blocks.
- WHOLE: the format has a prefix and suffix, counts rows, renders whole tables or whole
  files: the query runs non-streamed and its output is sent as it is.

Some settings change a streamable format into one with a prefix or suffix (JSONEachRow
with output_format_json_array_of_rows, CustomSeparated's result delimiters), and totals or
extremes come out of chdb's stream in a chunk of their own that repeats the header after
them. Where a plan depends on such a setting, or on WITH TOTALS, and the query might use
it, the query runs WHOLE too.
"""

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

from errors import ClickHouseError

CONCAT = "concat"
HEADER = "header"
VALUES = "values"
WHOLE = "whole"

LOGICAL_ERROR = 49


class CannotStream(Exception):
    """The chunks cannot be joined; raised before anything was yielded, so the query can
    run WHOLE instead."""


def _text_lines(count: int) -> Callable[[bytes], Optional[int]]:
    """A header of `count` lines, if no name holds a raw line break (escaped names, JSON
    arrays; the Raw formats write names unescaped and are checked further: raw_names)."""
    def length(data: bytes) -> Optional[int]:
        end = 0
        for _ in range(count):
            end = data.find(b"\n", end) + 1
            if end == 0:
                return None
        return end
    return length


def _csv_lines(count: int) -> Callable[[bytes], Optional[int]]:
    """A header of `count` CSV rows: a line break inside double quotes belongs to a name."""
    def length(data: bytes) -> Optional[int]:
        quoted, rows = False, 0
        for position, byte in enumerate(data):
            if byte == 0x22:  # '"'; a doubled quote toggles twice
                quoted = not quoted
            elif byte == 0x0A and not quoted:
                rows += 1
                if rows == count:
                    return position + 1
        return None
    return length


def _varint(data: bytes, position: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data):
            raise IndexError
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def _row_binary(rows: int) -> Callable[[bytes], Optional[int]]:
    """RowBinaryWithNames(AndTypes): the column count (varint), then `rows` lists of that
    many strings (varint length, bytes): the names, and the type names."""
    def length(data: bytes) -> Optional[int]:
        try:
            columns, position = _varint(data, 0)
            for _ in range(columns * rows):
                size, position = _varint(data, position)
                position += size
        except IndexError:
            return None
        return position if position <= len(data) else None
    return length


@dataclass(frozen=True)
class Plan:
    kind: str
    # The length of the header at the start of a chunk (HEADER), None if it is incomplete.
    header: Optional[Callable[[bytes], Optional[int]]] = None
    # Settings under which the plan does not hold: a name, or a prefix ending in "_".
    guards: Tuple[str, ...] = ()
    # Whether WITH TOTALS (or the extremes setting) breaks the plan.
    totals_matter: bool = False
    # Whether the header holds names unescaped (HEADER): then it is checked against a second chunk.
    raw_names: bool = False


_JSON_ROWS = ("output_format_json_array_of_rows",)
_CUSTOM = ("format_custom_",)
WHOLE_PLAN = Plan(WHOLE)

_PLANS: Dict[str, Plan] = {}


def _add(names: str, plan: Plan) -> None:
    for name in names.split():
        _PLANS[name.lower()] = plan


# Row formats without prefix or suffix.
_add("TabSeparated TSV TabSeparatedRaw TSVRaw Raw CSV LineAsString RawBLOB HiveText TSKV "
     "JSONCompactEachRow JSONCompactStringsEachRow RowBinary Native Buffers BSONEachRow MsgPack Protobuf Null",
     Plan(CONCAT))
_add("JSONEachRow JSONLines JSONL NDJSON JSONStringsEachRow PrettyJSONEachRow PrettyJSONLines PrettyNDJSON",
     Plan(CONCAT, guards=_JSON_ROWS))
_add("CustomSeparated", Plan(CONCAT, guards=_CUSTOM))
_add("Values", Plan(VALUES))
# Row formats with a header.
for rows, suffix in ((1, "WithNames"), (2, "WithNamesAndTypes")):
    _add("TabSeparated" + suffix + " TSV" + suffix, Plan(HEADER, _text_lines(rows), totals_matter=True))
    _add(" ".join(base + suffix for base in ("TabSeparatedRaw", "TSVRaw", "Raw", "LineAsString")),
         Plan(HEADER, _text_lines(rows), totals_matter=True, raw_names=True))
    _add("CSV" + suffix, Plan(HEADER, _csv_lines(rows), totals_matter=True))
    _add("JSONCompactEachRow" + suffix + " JSONCompactStringsEachRow" + suffix, Plan(HEADER, _text_lines(rows)))
    _add("CustomSeparated" + suffix, Plan(HEADER, _text_lines(rows), guards=_CUSTOM))
_add("RowBinaryWithNames", Plan(HEADER, _row_binary(1)))
_add("RowBinaryWithNamesAndTypes", Plan(HEADER, _row_binary(2),
                                        guards=("output_format_binary_encode_types_in_binary_format",)))
_add("Markdown MD", Plan(HEADER, _text_lines(2)))
# Everything else is WHOLE: JSON, JSONStrings, JSONCompact, JSONCompactStrings, JSONColumns,
# JSONCompactColumns, JSONColumnsWithMetadata, JSONObjectEachRow, the *WithProgress formats, XML,
# Pretty*, Vertical, SQLInsert, ODBCDriver2, MySQLWire, PostgreSQLWire, Hash, Parquet, Arrow,
# ArrowStream, ORC, Avro, ProtobufList, Npy, Template, and any format not named here.


def plan_for(format_name: str) -> Plan:
    return _PLANS.get(format_name.lower(), WHOLE_PLAN)


def guard_words(plan: Plan) -> Tuple[str, ...]:
    """Words whose presence in the query text may break the plan (a SETTINGS clause, WITH
    TOTALS): a query that has them runs WHOLE. Crude, but only ever costs the streaming."""
    words = plan.guards
    if plan.totals_matter:
        words += ("totals", "extremes")
    return words


def guard_settings(plan: Plan) -> Tuple[str, ...]:
    """Settings whose value, if not the default, breaks the plan."""
    return plan.guards + (("extremes",) if plan.totals_matter else ())


def join(plan: Plan, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks of a streamed result as parts of one document, following the plan."""
    if plan.kind == CONCAT:
        yield from chunks
    elif plan.kind == VALUES:
        first = True
        for data in chunks:
            if data:
                yield data if first else b"," + data
                first = False
    elif plan.kind == HEADER:
        yield from _join_headed(plan, iter(chunks))
    else:
        raise ValueError(f"plan {plan.kind} does not stream")


def _line_at(data: bytes, start: int) -> bytes:
    end = data.find(b"\n", start)
    return data[start:] if end < 0 else data[start:end]


def _join_headed(plan: Plan, chunks: Iterator[bytes]) -> Iterator[bytes]:
    first = next(chunks, None)
    if first is None:
        return
    length = plan.header(first)
    if length is None:
        raise CannotStream("no header in the first block of output")
    header = first[:length]
    if plan.raw_names:
        second = next(chunks, None)
        if second is not None:
            if not second.startswith(header) or _line_at(first, length) == _line_at(second, length):
                raise CannotStream("the header may go on beyond its expected lines")
            chunks = itertools.chain([second], chunks)
    yield first
    for data in chunks:
        if not data.startswith(header):
            raise ClickHouseError(LOGICAL_ERROR, "LOGICAL_ERROR",
                                  "chdb_server: a block of output does not start with the header of the first")
        yield data[length:]
