//! Planning, as a pure function: which windows tile a range, which are sealed, which ready jobs
//! serve them, and which sub-ranges must still be read raw.
//!
//! Windows are UTC weeks (starting Monday) for the bulk, UTC days around them, and UTC hours
//! inside the partial first and last days, so raw reads cover less than an hour at each end, plus
//! the windows not sealed yet (recent data, where late events may still land) and the windows
//! whose builds are not ready. A window is served by its own job or, failing that, by its
//! children's (a week by seven days, a day by 24 hours); a window that is not built whole is built
//! whole, while whatever its children already have is served meanwhile.

use crate::sql::window::{Edge, RawRange, ReadyJob, Window};

/// One hour in microseconds.
pub const HOUR: i64 = 3_600_000_000;
/// One day in microseconds.
pub const DAY: i64 = 24 * HOUR;
/// One week in microseconds.
pub const WEEK: i64 = 7 * DAY;
/// Weeks start on Monday: the first Monday after the Unix epoch (a Thursday) is 4 days in.
const WEEK_OFFSET: i64 = 4 * DAY;

/// What to read for one occurrence.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// Windows served from jobs, with the job ids, in time order.
    pub served: Vec<ReadyJob>,
    /// Sub-ranges read from the source table, in time order.
    pub raw: Vec<RawRange>,
    /// Sealed windows that no ready job covers whole: to build.
    pub missing: Vec<Window>,
    /// Windows too recent to build.
    pub unsealed: Vec<Window>,
}

impl Plan {
    /// Whether any window is served from preaggregates (otherwise the occurrence is left alone).
    pub fn serves_any(&self) -> bool {
        !self.served.is_empty()
    }
}

fn floor_to(v: i64, unit: i64) -> i64 {
    v.div_euclid(unit) * unit
}

fn ceil_to(v: i64, unit: i64) -> i64 {
    -(-v).div_euclid(unit) * unit
}

/// Whether `at` starts a window of length `unit`.
fn aligned(at: i64, unit: i64) -> bool {
    let offset = if unit == WEEK { WEEK_OFFSET } else { 0 };
    (at - offset).rem_euclid(unit) == 0
}

/// The windows one level down: a week's seven days, a day's 24 hours; none for an hour.
pub fn children(w: Window) -> Option<Vec<Window>> {
    let unit = match w.end - w.start {
        WEEK => DAY,
        DAY => HOUR,
        _ => return None,
    };
    Some((w.start..w.end).step_by(unit as usize).map(|s| Window { start: s, end: s + unit }).collect())
}

/// The windows that tile the inside of `[start, end)`, largest first where aligned: hours up to
/// the first midnight, days up to the first Monday, whole weeks, then days and hours. Every window
/// lies inside the range.
pub fn grid(start: i64, end: i64) -> Vec<Window> {
    let (mut cursor, last) = (ceil_to(start, HOUR), floor_to(end, HOUR));
    let mut out = Vec::new();
    while cursor < last {
        let unit = [WEEK, DAY, HOUR].into_iter().find(|&u| aligned(cursor, u) && cursor + u <= last).unwrap_or(HOUR);
        out.push(Window { start: cursor, end: cursor + unit });
        cursor += unit;
    }
    out
}

/// Plans `[start, end)` at `now`: a window is sealed once its end is `seal_after` old.
pub fn plan(range: (i64, i64), ready: &[ReadyJob], now: i64, seal_after: i64) -> Plan {
    let mut planner = Planner { ready, sealed_before: now.saturating_sub(seal_after), plan: Plan::default() };
    for window in grid(range.0, range.1) {
        planner.tile(window);
    }
    let mut plan = planner.plan;
    plan.raw = gaps(range, &plan.served);
    plan
}

struct Planner<'a> {
    ready: &'a [ReadyJob],
    sealed_before: i64,
    plan: Plan,
}

impl Planner<'_> {
    fn job(&self, w: Window) -> Option<&ReadyJob> {
        self.ready.iter().find(|j| j.window == w)
    }

    fn tile(&mut self, w: Window) {
        if w.end > self.sealed_before {
            match children(w) {
                Some(children) => children.into_iter().for_each(|c| self.tile(c)),
                None => self.plan.unsealed.push(w),
            }
            return;
        }
        if let Some(job) = self.job(w).cloned() {
            self.plan.served.push(job);
            return;
        }
        let served_before = self.plan.served.len();
        self.serve_parts(w);
        let covered: i64 = self.plan.served[served_before..].iter().map(|j| j.window.end - j.window.start).sum();
        if covered < w.end - w.start {
            self.plan.missing.push(w);
        }
    }

    /// Serves whatever ready jobs cover parts of `w` (its children, recursively).
    fn serve_parts(&mut self, w: Window) {
        for child in children(w).unwrap_or_default() {
            match self.job(child).cloned() {
                Some(job) => self.plan.served.push(job),
                None => self.serve_parts(child),
            }
        }
    }
}

/// The parts of `range` not covered by `served` (sorted, non-overlapping), as raw sub-ranges.
fn gaps(range: (i64, i64), served: &[ReadyJob]) -> Vec<RawRange> {
    let edge = |at: i64, original: i64| if at == original { Edge::Original } else { Edge::At(at) };
    let mut out = Vec::new();
    let mut cursor = range.0;
    for job in served {
        if job.window.start > cursor {
            out.push(RawRange { start: edge(cursor, range.0), end: Edge::At(job.window.start) });
        }
        cursor = job.window.end;
    }
    if cursor < range.1 {
        out.push(RawRange { start: edge(cursor, range.0), end: Edge::Original });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D0: i64 = 1_577_836_800_000_000; // 2020-01-01 00:00 UTC

    #[test]
    fn grid_uses_hours_at_the_ends_then_days_then_weeks() {
        // 2020-01-01 is a Wednesday: days to Monday 2020-01-06, two weeks, days, hours.
        let g = grid(D0 + 9 * HOUR + 57 * 60_000_000, D0 + 23 * DAY + 14 * HOUR + 30 * 60_000_000);
        let count = |unit| g.iter().filter(|w| w.end - w.start == unit).count();
        assert_eq!((count(WEEK), count(DAY), count(HOUR)), (2, 4 + 4, 14 + 14));
        assert_eq!(g.first().unwrap().start, D0 + 10 * HOUR);
        let monday = D0 + 5 * DAY;
        assert!(g.contains(&Window { start: monday, end: monday + WEEK }));
        assert_eq!(g.last().unwrap().end, D0 + 23 * DAY + 14 * HOUR);
        assert!(grid(D0 + 1, D0 + HOUR).is_empty());
    }

    #[test]
    fn plan_serves_ready_windows_and_reads_the_rest_raw() {
        let range = (D0 + 30 * 60_000_000, D0 + 2 * DAY);
        let now = D0 + 10 * DAY;
        let windows = grid(range.0, range.1);
        let ready: Vec<ReadyJob> = windows
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(i, w)| ReadyJob { id: format!("j{i}"), window: *w, rows: 1, built_at: 0 })
            .collect();
        let p = plan(range, &ready, now, 2 * HOUR);
        assert_eq!(p.missing, vec![windows[3]]);
        assert_eq!(
            p.raw,
            vec![
                RawRange { start: Edge::Original, end: Edge::At(D0 + HOUR) },
                RawRange { start: Edge::At(windows[3].start), end: Edge::At(windows[3].end) },
            ]
        );
        // A day covered by 24 ready hours is served by them.
        let hours: Vec<ReadyJob> = (0..24)
            .map(|h| ReadyJob {
                rows: 1,
                built_at: 0,
                id: format!("h{h}"),
                window: Window { start: D0 + DAY + h * HOUR, end: D0 + DAY + (h + 1) * HOUR },
            })
            .collect();
        let p = plan((D0 + DAY, D0 + 2 * DAY), &hours, now, 2 * HOUR);
        assert_eq!((p.served.len(), p.raw.len(), p.missing.len()), (24, 0, 0));
    }

    #[test]
    fn a_week_not_built_whole_is_built_while_its_ready_days_serve() {
        let monday = D0 + 5 * DAY;
        let days: Vec<ReadyJob> = (0..5)
            .map(|d| ReadyJob {
                id: format!("d{d}"),
                window: Window { start: monday + d * DAY, end: monday + (d + 1) * DAY },
                rows: 1,
                built_at: 0,
            })
            .collect();
        let p = plan((monday, monday + WEEK), &days, monday + 30 * DAY, 2 * HOUR);
        assert_eq!(p.served.len(), 5);
        assert_eq!(p.missing, vec![Window { start: monday, end: monday + WEEK }]);
        assert_eq!(p.raw, vec![RawRange { start: Edge::At(monday + 5 * DAY), end: Edge::Original }]);
    }

    #[test]
    fn unsealed_windows_are_read_raw() {
        let now = D0 + DAY + 3 * HOUR;
        let p = plan((D0, now), &[], now, 2 * HOUR);
        // Sealed: the day, and the first hour after it (ended exactly `seal_after` ago).
        assert_eq!(p.unsealed.first().map(|w| w.start), Some(D0 + DAY + HOUR));
        assert_eq!(
            p.missing,
            vec![Window { start: D0, end: D0 + DAY }, Window { start: D0 + DAY, end: D0 + DAY + HOUR }]
        );
        assert!(!p.serves_any());
    }

    proptest! {
        /// Grid windows are contiguous, inside the range, and leave less than an hour at each end.
        #[test]
        fn grid_tiles_the_inside(start in 0i64..(40 * DAY), len in 0i64..(40 * DAY)) {
            let (s, e) = (D0 + start, D0 + start + len);
            let g = grid(s, e);
            for pair in g.windows(2) { prop_assert_eq!(pair[0].end, pair[1].start); }
            if let (Some(first), Some(last)) = (g.first(), g.last()) {
                prop_assert!(first.start >= s && first.start - s < HOUR);
                prop_assert!(last.end <= e && e - last.end < HOUR);
            } else {
                prop_assert!(ceil_to(s, HOUR) >= floor_to(e, HOUR));
            }
        }

        /// Served windows and raw sub-ranges partition the range exactly.
        #[test]
        fn plan_partitions_the_range(start in 0i64..(10 * DAY), len in 1i64..(10 * DAY), mask in any::<u64>()) {
            let range = (D0 + start, D0 + start + len);
            let ready: Vec<ReadyJob> = grid(range.0, range.1).into_iter().enumerate()
                .filter(|(i, _)| mask >> (i % 64) & 1 == 1)
                .map(|(i, w)| ReadyJob { id: i.to_string(), window: w, rows: 1, built_at: 0 }).collect();
            let p = plan(range, &ready, D0 + 100 * DAY, 2 * HOUR);
            let mut pieces: Vec<(i64, i64)> = p.served.iter().map(|j| (j.window.start, j.window.end)).collect();
            for r in &p.raw {
                let s = match r.start { Edge::Original => range.0, Edge::At(a) => a };
                let e = match r.end { Edge::Original => range.1, Edge::At(a) => a };
                pieces.push((s, e));
            }
            pieces.sort();
            let mut cursor = range.0;
            for (s, e) in pieces { prop_assert_eq!(s, cursor); prop_assert!(e > s); cursor = e; }
            prop_assert_eq!(cursor, range.1);
        }
    }
}
