SELECT toStartOfDay(timestamp) AS day, count() AS events, uniq(person_id) AS persons
FROM events
WHERE team_id = 2 AND event = '$pageview' AND timestamp >= toDateTime('2026-10-01 00:00:00', 'UTC')
  AND timestamp < toDateTime('2026-10-29 00:00:00', 'UTC')
GROUP BY day
ORDER BY day
FORMAT TabSeparated
