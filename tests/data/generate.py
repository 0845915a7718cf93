#!/usr/bin/env python3
"""Fills PostHog's events schema (schema.sql) with experiment data, through ClickHouse's HTTP interface.

    generate.py --url http://HOST:PORT --events N --seed S [--start 2026-10-01] [--days 28]
                [--team 99999] [--flag test-experiment] [--variants control,test]
                [--database default] [--replace]

Every row is computed inside ClickHouse by INSERT ... SELECT over numbers(), as a function of the
row number and the seed only (hash functions, never rand()), so the same arguments give the same
data; 50M events take about 80 s on 2 cores. Shares are of --events:

- persons: events/40 of the main team, each with 1-3 distinct_ids; 80% of them are exposed.
  Every 20th person (p % 20 == 1) was merged into the person before it: its distinct_ids have
  override rows (version 1 to itself, version 2 to the other person; for the first distinct_id of
  every 5th such person a version 3 with is_deleted = 1 undoes the merge). Rows with the same
  distinct_ids for team 2 are a trap for queries that forget the team filter.
- 30% `$feature_flag_called` exposures of --flag with `$feature_flag_response` one of --variants:
  3 per active day, on about 5 active days per exposed person; 3% of persons (p % 33 == 3) see a
  second variant, half of them within one day, half on another day; 1% of exposures answer 'holdout'.
- 3% exposures of other flags (other-flag-0..2) for the same persons.
- 55% metric events of all main-team persons: a `signup` first, then `$pageview`, `login` and
  `purchase` (with a numeric `amount` property); an exposed person's pageviews carry its variant
  as `$feature/<flag>`.
- 12% events of teams 2 and 1000, 30% of them exposures of the same flag name.

Timestamps carry microseconds and lie in [start, start + days). The microseconds modulo 1000 of an
event are its number among its person's events (merged persons use another range), so no person
has two events at the same microsecond, merges included.
"""

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = Path(__file__).with_name("schema.sql")
DAY_US = 86_400_000_000
OTHER_TEAMS = (2, 1000)
OTHER_TEAM_PERSON_KEYS = 10**12   # keeps their persons apart from the main team's in the hashes
MERGE_EVERY = 20                  # persons p with p % 20 == 1 merged into p - 1
SOURCE_SEQUENCE_OFFSET = 500      # event numbers of merged persons, apart from their target's


def sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def json_object(fields: dict) -> str:
    """SQL building the text of a JSON object. Each field is (expression, is_string) or
    (expression, is_string, condition) for a field only present where condition holds."""
    parts = []
    for key, (expression, is_string, *condition) in fields.items():
        value = f"toJSONString({expression})" if is_string else f"toString({expression})"
        member = f"concat({sql_string(json.dumps(key) + ': ')}, {value})"
        parts.append(f"if({condition[0]}, {member}, '')" if condition else member)
    return f"concat('{{', arrayStringConcat(arrayFilter(member -> member != '', [{', '.join(parts)}]), ', '), '}}')"


@dataclass(frozen=True)
class Plan:
    """How many rows of each kind, from --events."""
    events: int

    @property
    def persons(self) -> int:
        return max(1, self.events // 40)

    @property
    def exposed_persons(self) -> int:
        return self.persons - self.persons // 5   # all but p % 5 == 4

    @property
    def exposures(self) -> int:
        return self.events * 30 // 100

    @property
    def other_flag_exposures(self) -> int:
        return self.events * 3 // 100

    @property
    def metric_events(self) -> int:
        return self.events * 55 // 100

    @property
    def other_team_events(self) -> int:
        return self.events - self.exposures - self.other_flag_exposures - self.metric_events

    @property
    def other_team_persons(self) -> int:
        return max(1, self.other_team_events // 20)


class Generator:
    """The SQL that generates the data. Row offsets keep event numbers unique across inserts."""

    def __init__(self, args: argparse.Namespace):
        self.seed = args.seed
        self.team = args.team
        self.days = args.days
        self.flag = sql_string(args.flag)
        self.flag_key = args.flag
        self.variants = "[" + ", ".join(sql_string(v) for v in args.variants) + "]"
        self.start_us = int(datetime.fromisoformat(args.start).replace(tzinfo=timezone.utc).timestamp()) * 1_000_000
        self.plan = Plan(args.events)

    # Hashes depend on the binary type of their arguments, and `number % 250` is a UInt8 while
    # `number % 100000` is a UInt32: every hashed value is widened to 64 bits first.

    def hash(self, label: str, *values: str) -> str:
        return f"cityHash64({self.seed}, '{label}', {', '.join(f'toUInt64({v})' for v in values)})"

    def uuid(self, label: str, *values: str) -> str:
        return f"reinterpretAsUUID(sipHash128({self.seed}, '{label}', {', '.join(f'toUInt64({v})' for v in values)}))"

    def person_uuid(self, team: str, person: str) -> str:
        return self.uuid("person", team, person)

    def distinct_id(self, person: str, prefix: str = "'user-'") -> str:
        """One of the person's 1-3 distinct_ids, chosen by the event number n."""
        count = f"(1 + {self.hash('distinct_ids', person)} % 3)"
        return f"concat({prefix}, toString({person}), '-', toString({self.hash('which_id', 'n')} % {count}))"

    def first_day(self, person: str) -> str:
        return f"({self.hash('first_day', person)} % {self.days})"

    def sequence_offset(self, person: str) -> str:
        return f"if({person} % {MERGE_EVERY} = 1, {SOURCE_SEQUENCE_OFFSET}, 0)"

    def events_insert(self, source: str, event: str, properties: dict) -> str:
        """INSERT of the events one FROM source describes, with its columns n (event number),
        team, person_key, person, distinct_id, day and seq (number among the person's events)."""
        session = f"toString({self.uuid('session', 'person_key', 'day')})"
        properties = {"$session_id": ("session", True), **properties}
        timestamp = (f"fromUnixTimestamp64Micro(toInt64({self.start_us} + day * {DAY_US} + seq"
                     f" + 1000 * ({self.hash('time', 'person_key', 'seq')} % 86399999)), 'UTC')")
        return f"""
INSERT INTO events (uuid, event, properties, timestamp, team_id, distinct_id, person_id, `$session_id`,
                    elements_chain, created_at, _timestamp, inserted_at)
SELECT uuid, event, properties, timestamp, team, distinct_id, person, session, '', created_at, toDateTime(created_at),
       created_at
FROM
(
    SELECT *,
        {self.uuid('event', 'n')} AS uuid,
        {event} AS event,
        {session} AS session,
        {json_object(properties)} AS properties,
        {timestamp} AS timestamp,
        timestamp + toIntervalMillisecond({self.hash('ingestion', 'n')} % 5000) AS created_at
    FROM ({source})
)
SETTINGS max_insert_threads = 2, output_format_json_escape_forward_slashes = 0"""

    def exposure_source(self, offset: int, rows: int, columns: str) -> str:
        """Rows n of the j-th exposure of exposed person p (the k-th of them), with more columns."""
        exposed = self.plan.exposed_persons
        return f"""
        SELECT {offset} + number AS n, number % {exposed} AS k, intDiv(number, {exposed}) AS j,
               intDiv(k, 4) * 5 + k % 4 AS p, {self.team} AS team, p AS person_key,
               {self.person_uuid('team', 'p')} AS person, {self.distinct_id('p')} AS distinct_id,
               {columns}
        FROM numbers({rows})"""

    def exposures(self, offset: int) -> str:
        # Each exposed person: 3 exposures per active day, active days `gap` days apart.
        variants = self.variants
        source = self.exposure_source(offset, self.plan.exposures, f"""
               intDiv(j, 3) AS active_day,
               ({self.first_day('p')} + active_day * (1 + {self.hash('gap', 'p')} % 3)) % {self.days} AS day,
               j + {self.sequence_offset('p')} AS seq,
               {self.hash('variant', 'p')} % length({variants}) AS v,
               p % 33 = 3 AND if(intDiv(p, 33) % 2 = 0, j = 1, active_day = 1) AS switched,
               multiIf({self.hash('holdout', 'n')} % 100 = 0, 'holdout',
                       switched, {variants}[(v + 1) % length({variants}) + 1],
                       {variants}[v + 1]) AS variant""")
        return self.events_insert(source, "'$feature_flag_called'", {
            "$feature_flag": (self.flag, True), "$feature_flag_response": ("variant", True)})

    def other_flag_exposures(self, offset: int) -> str:
        source = self.exposure_source(offset, self.plan.other_flag_exposures, f"""
               ({self.first_day('p')} + j) % {self.days} AS day,
               150 + j + {self.sequence_offset('p')} AS seq,
               concat('other-flag-', toString({self.hash('other_flag', 'n')} % 3)) AS flag,
               ['true', 'false', 'control', 'test'][{self.hash('other_response', 'n')} % 4 + 1] AS variant""")
        return self.events_insert(source, "'$feature_flag_called'", {
            "$feature_flag": ("flag", True), "$feature_flag_response": ("variant", True)})

    def metric_events(self, offset: int) -> str:
        persons = self.plan.persons
        source = f"""
        SELECT {offset} + number AS n, number % {persons} AS p, intDiv(number, {persons}) AS j,
               {self.team} AS team, p AS person_key, {self.person_uuid('team', 'p')} AS person,
               {self.distinct_id('p')} AS distinct_id,
               if(j = 0, {self.first_day('p')},
                  ({self.first_day('p')} + {self.hash('metric_day', 'n')} % 10) % {self.days}) AS day,
               200 + j + {self.sequence_offset('p')} AS seq,
               {self.hash('metric', 'n')} % 100 AS kind,
               multiIf(j = 0, 'signup', kind < 55, '$pageview', kind < 75, 'login', 'purchase') AS name,
               ['Chrome', 'Firefox', 'Safari', 'Edge'][{self.hash('browser', 'p')} % 4 + 1] AS browser,
               concat('https://example.com/page/', toString({self.hash('page', 'n')} % 20)) AS url,
               round(5 + ({self.hash('amount', 'n')} % 20000) / 100, 2) AS amount
        FROM numbers({self.plan.metric_events})"""
        # An exposed person's pageviews carry the variant as `$feature/<flag>`, as PostHog's SDKs
        # send it: what a custom exposure criterion reads.
        variant = f"{self.variants}[{self.hash('variant', 'p')} % length({self.variants}) + 1]"
        return self.events_insert(source, "name", {
            "$browser": ("browser", True),
            "$current_url": ("url", True, "name = '$pageview'"),
            f"$feature/{self.flag_key}": (variant, True, "name = '$pageview' AND p % 5 != 4"),
            "amount": ("amount", False, "name = 'purchase'")})

    def other_team_events(self, offset: int) -> str:
        persons = self.plan.other_team_persons
        source = f"""
        SELECT {offset} + number AS n, number % {persons} AS p, intDiv(number, {persons}) AS seq,
               [{', '.join(map(str, OTHER_TEAMS))}][p % {len(OTHER_TEAMS)} + 1] AS team,
               {OTHER_TEAM_PERSON_KEYS} + p AS person_key, {self.person_uuid('team', 'p')} AS person,
               {self.distinct_id('p', "concat('team-', toString(team), '-user-')")} AS distinct_id,
               {self.hash('other_day', 'n')} % {self.days} AS day,
               {self.hash('other_kind', 'n')} % 100 < 30 AS exposure,
               {self.variants}[{self.hash('other_variant', 'p')} % length({self.variants}) + 1] AS variant
        FROM numbers({self.plan.other_team_events})"""
        return self.events_insert(source, "if(exposure, '$feature_flag_called', '$pageview')", {
            "$feature_flag": (self.flag, True, "exposure"),
            "$feature_flag_response": ("variant", True, "exposure")})

    def overrides(self) -> str:
        """Versions of the merged persons' distinct_ids, kept apart (optimize_on_insert = 0)."""
        count = f"(1 + {self.hash('distinct_ids', 'p')} % 3)"
        return f"""
INSERT INTO person_distinct_id_overrides (team_id, distinct_id, person_id, is_deleted, version)
SELECT team_id, distinct_id, person_id, is_deleted, version
FROM
(
    SELECT number AS p, arrayJoin(range({count})) AS k, arrayJoin([1, 2, 3, 0]) AS version,
           concat('user-', toString(p), '-', toString(k)) AS distinct_id,
           k = 0 AND intDiv(p, {MERGE_EVERY}) % 5 = 0 AS unmerged,
           if(version = 0, 2, {self.team}) AS team_id,
           multiIf(version = 0, {self.uuid('trap', 'p', 'k')},
                   version = 1, {self.person_uuid(str(self.team), 'p')},
                   {self.person_uuid(str(self.team), 'p - 1')}) AS person_id,
           toInt8(version = 3) AS is_deleted
    FROM numbers({self.plan.persons})
    WHERE p % {MERGE_EVERY} = 1
)
WHERE version != 3 OR unmerged
SETTINGS optimize_on_insert = 0"""

    def inserts(self):
        plan = self.plan
        offsets = [0, plan.exposures, plan.exposures + plan.other_flag_exposures,
                   plan.exposures + plan.other_flag_exposures + plan.metric_events]
        return [
            ("exposures", self.exposures(offsets[0])),
            ("other_flag_exposures", self.other_flag_exposures(offsets[1])),
            ("metric_events", self.metric_events(offsets[2])),
            ("other_team_events", self.other_team_events(offsets[3])),
            ("overrides", self.overrides()),
        ]


class Client:
    """Just enough of ClickHouse's HTTP interface: POST a statement, get its output."""

    def __init__(self, url: str, database: str):
        self.url = url.rstrip("/") + "/"
        self.database = database

    def run(self, sql: str, database: bool = True) -> str:
        params = {"database": self.database} if database else {}
        request = urllib.request.Request(self.url + "?" + urllib.parse.urlencode(params), data=sql.encode())
        try:
            with urllib.request.urlopen(request) as response:
                return response.read().decode()
        except urllib.error.HTTPError as error:
            raise SystemExit(f"generate.py: ClickHouse answered {error.code}: {error.read().decode().strip()}\n"
                             f"for: {sql.strip()[:300]}")
        except urllib.error.URLError as error:
            raise SystemExit(f"generate.py: cannot reach {self.url}: {error.reason}")

    def json_rows(self, sql: str) -> list:
        return [json.loads(line) for line in self.run(sql + " FORMAT JSONEachRow").splitlines()]


def create_schema(client: Client, replace: bool) -> None:
    client.run(f"CREATE DATABASE IF NOT EXISTS `{client.database}`", database=False)
    for statement in SCHEMA.read_text().split(";\n"):
        if statement.strip() and not all(line.startswith("--") for line in statement.strip().splitlines()):
            client.run(statement)
    if replace:
        client.run("TRUNCATE TABLE events")
        client.run("TRUNCATE TABLE person_distinct_id_overrides")
    elif int(client.run("SELECT count() FROM events")) > 0:
        raise SystemExit("generate.py: table events is not empty; pass --replace to start over")


def summary(client: Client, args: argparse.Namespace, timings: dict) -> dict:
    events_by_kind = client.json_rows(
        "SELECT team_id, event, count() AS rows FROM events GROUP BY team_id, event ORDER BY team_id, event")
    facts = client.json_rows(f"""
        SELECT count() AS events, uniqExact(person_id) AS main_team_persons,
               toString(min(timestamp)) AS first_timestamp, toString(max(timestamp)) AS last_timestamp,
               (SELECT count() FROM person_distinct_id_overrides) AS override_rows
        FROM events WHERE team_id = {args.team}""")[0]
    return {
        "database": args.database,
        "seed": args.seed,
        "rows": {"events": int(client.run("SELECT count() FROM events")), "person_distinct_id_overrides":
                 int(facts.pop("override_rows"))},
        "events_by_team_and_event": {f"{row['team_id']}/{row['event']}": int(row["rows"]) for row in events_by_kind},
        "main_team": facts,
        "elapsed_seconds": timings,
    }


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="ClickHouse HTTP interface, e.g. http://127.0.0.1:8123")
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--start", default="2026-10-01", help="first day (UTC), YYYY-MM-DD")
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--team", type=int, default=99999)
    parser.add_argument("--flag", default="test-experiment")
    parser.add_argument("--variants", default="control,test", type=lambda text: text.split(","))
    parser.add_argument("--database", default="default")
    parser.add_argument("--replace", action="store_true", help="empty the tables first")
    args = parser.parse_args(argv)
    if args.events < 1 or args.days < 1 or not all(args.variants):
        parser.error("--events and --days must be positive and --variants non-empty")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    client = Client(args.url, args.database)
    generator = Generator(args)
    timings = {}
    started = time.monotonic()
    create_schema(client, args.replace)
    timings["schema"] = round(time.monotonic() - started, 3)
    for name, sql in generator.inserts():
        step = time.monotonic()
        client.run(sql)
        timings[name] = round(time.monotonic() - step, 3)
    timings["total"] = round(time.monotonic() - started, 3)
    print(json.dumps(summary(client, args, timings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
