//! Vietnam's working calendar: which days count in a deadline of "N working days". Saturdays
//! and Sundays are off, public holidays on weekdays are off, and a Saturday the government
//! swaps for a weekday off is a working day (a make-up working day). The days come from a
//! data file (`calendar_vn.tsv`, or the operator's own under `[cases] calendar`).

use std::collections::BTreeMap;

use time::{Date, Duration, OffsetDateTime, UtcOffset, Weekday, macros::offset};

/// Vietnam's time (UTC+7, no daylight saving): deadlines are counted in its calendar days.
pub const VIETNAM: UtcOffset = offset!(+7);

/// The calendar shipped with the gateway.
pub const EMBEDDED: &str = include_str!("calendar_vn.tsv");

/// A day the calendar lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listed {
    /// A weekday off (a public holiday, or a day swapped for a Saturday).
    Holiday,
    /// A Saturday or Sunday worked (a make-up working day).
    Working,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    days: BTreeMap<Date, Listed>,
    /// The last day the calendar knows (31 December of its last year): after it only
    /// weekends count.
    last: Date,
}

impl Calendar {
    /// Parses `date<TAB>holiday|working<TAB>what` lines (`#` comments, blank lines).
    /// Errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut days = BTreeMap::new();
        let mut last_year = None;
        let format = time::macros::format_description!("[year]-[month]-[day]");
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let at = |m: String| format!("line {}: {m}", n + 1);
            let mut cols = line.split('\t');
            let (date, kind) = (cols.next().unwrap_or(""), cols.next().unwrap_or(""));
            let date = Date::parse(date.trim(), format)
                .map_err(|_| at(format!("{date:?} is not a YYYY-MM-DD date")))?;
            let kind = match kind.trim() {
                "holiday" => Listed::Holiday,
                "working" => Listed::Working,
                other => {
                    return Err(at(format!(
                        "{other:?}: the kind is \"holiday\" or \"working\""
                    )));
                }
            };
            let weekend = is_weekend(date);
            if kind == Listed::Working && !weekend {
                return Err(at(format!(
                    "{date} is a weekday: only a Saturday or Sunday can be a make-up working day"
                )));
            }
            if days.insert(date, kind).is_some() {
                return Err(at(format!("{date} is listed twice")));
            }
            last_year = last_year.max(Some(date.year()));
        }
        let last_year = last_year.ok_or("the calendar lists no day")?;
        let last = Date::from_calendar_date(last_year, time::Month::December, 31)
            .map_err(|e| e.to_string())?;
        Ok(Self { days, last })
    }

    /// The calendar shipped with the gateway.
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED).unwrap_or_else(|e| panic!("calendar_vn.tsv: {e}"))
    }

    /// The last day the calendar knows.
    pub fn last_day(&self) -> Date {
        self.last
    }

    /// Does `day` count as a working day?
    pub fn is_working(&self, day: Date) -> bool {
        match self.days.get(&day) {
            Some(Listed::Holiday) => false,
            Some(Listed::Working) => true,
            None => !is_weekend(day),
        }
    }

    /// The end (midnight, Vietnam time) of the `n`th working day after the day of `from`: a
    /// request received on any day, at any hour, has until the end of the `n`th working day
    /// that follows it. `n` ≥ 1.
    pub fn working_days_after(&self, from: OffsetDateTime, n: u32) -> OffsetDateTime {
        let mut day = from.to_offset(VIETNAM).date();
        let mut counted = 0;
        while counted < n {
            let Some(next) = day.next_day() else { break };
            day = next;
            if self.is_working(day) {
                counted += 1;
            }
        }
        let end = day.next_day().unwrap_or(day);
        end.midnight().assume_offset(VIETNAM)
    }
}

fn is_weekend(d: Date) -> bool {
    matches!(d.weekday(), Weekday::Saturday | Weekday::Sunday)
}

/// How long a flow gives its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Within {
    /// Until the end of the Nth working day after the request's day.
    WorkingDays(u32),
    /// Elapsed time (hours, or seconds for drills and tests).
    Elapsed(Duration),
}

impl Within {
    /// When a request made at `from` is due.
    pub fn due(self, calendar: &Calendar, from: OffsetDateTime) -> OffsetDateTime {
        match self {
            Within::WorkingDays(n) => calendar.working_days_after(from, n),
            Within::Elapsed(d) => from + d,
        }
    }
}

impl std::fmt::Display for Within {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Within::WorkingDays(n) => write!(f, "{n} working day(s)"),
            Within::Elapsed(d) if d.whole_seconds() % 3600 == 0 => {
                write!(f, "{} hour(s)", d.whole_hours())
            }
            Within::Elapsed(d) => write!(f, "{} second(s)", d.whole_seconds()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn vn(t: OffsetDateTime) -> OffsetDateTime {
        t.to_offset(VIETNAM)
    }

    #[test]
    fn the_embedded_calendar_parses_and_covers_the_coming_year() {
        let c = Calendar::embedded();
        assert!(c.last_day().year() >= 2027);
        // Tết 2026: Monday 16 to Friday 20 February.
        for d in 16..=20 {
            let day = Date::from_calendar_date(2026, time::Month::February, d).unwrap();
            assert!(!c.is_working(day), "{day}");
        }
        let sat = Date::from_calendar_date(2025, time::Month::February, 8).unwrap();
        assert!(c.is_working(sat), "make-up working day");
    }

    /// Each row: received at, working days given, due (Vietnam time).
    #[test]
    fn working_days_skip_weekends_holidays_and_count_make_up_days() {
        let c = Calendar::embedded();
        for (from, n, due, why) in [
            // Thursday → Friday; Friday → Monday (the weekend skipped).
            (
                datetime!(2026-12-03 10:00 +7),
                1,
                datetime!(2026-12-05 00:00 +7),
                "Thursday + 1",
            ),
            (
                datetime!(2026-12-04 10:00 +7),
                1,
                datetime!(2026-12-08 00:00 +7),
                "Friday + 1: Monday",
            ),
            (
                datetime!(2026-12-04 10:00 +7),
                3,
                datetime!(2026-12-10 00:00 +7),
                "Friday + 3",
            ),
            // Received on a Saturday: Monday is the first working day after it.
            (
                datetime!(2026-12-05 09:00 +7),
                1,
                datetime!(2026-12-08 00:00 +7),
                "Saturday + 1",
            ),
            // Late in the evening UTC is the next day in Vietnam.
            (
                datetime!(2026-12-03 18:30 UTC),
                1,
                datetime!(2026-12-08 00:00 +7),
                "Friday 01:30 in Hà Nội",
            ),
            // Tết 2026 (16–20 February) and its weekends: Friday 13 + 1 = Monday 23.
            (
                datetime!(2026-02-13 15:00 +7),
                1,
                datetime!(2026-02-24 00:00 +7),
                "over Tết",
            ),
            // Reunification Day and Labour Day 2026 (Thursday 30 April, Friday 1 May).
            (
                datetime!(2026-04-29 08:00 +7),
                2,
                datetime!(2026-05-06 00:00 +7),
                "over 30/4 and 1/5",
            ),
            // Tết 2025: Friday 24 January + 1 skips 27–31 January (27 swapped): Monday 3
            // February; the make-up Saturday 8 February counts as a working day.
            (
                datetime!(2025-01-24 08:00 +7),
                1,
                datetime!(2025-02-04 00:00 +7),
                "over Tết 2025",
            ),
            (
                datetime!(2025-02-07 08:00 +7),
                1,
                datetime!(2025-02-09 00:00 +7),
                "Friday + 1 is the make-up Saturday",
            ),
            // 2 May 2025 (swapped) is off, Saturday 26 April (its make-up day) is worked.
            (
                datetime!(2025-04-25 08:00 +7),
                1,
                datetime!(2025-04-27 00:00 +7),
                "Friday + 1 is the make-up Saturday 26 April",
            ),
        ] {
            let got = Within::WorkingDays(n).due(&c, from);
            assert_eq!(vn(got), vn(due), "{why}");
        }
    }

    #[test]
    fn elapsed_deadlines_ignore_the_calendar() {
        let c = Calendar::embedded();
        let from = datetime!(2026-02-15 23:00 +7);
        assert_eq!(
            Within::Elapsed(Duration::hours(24)).due(&c, from),
            datetime!(2026-02-16 23:00 +7)
        );
        assert_eq!(
            Within::Elapsed(Duration::seconds(2)).due(&c, from),
            datetime!(2026-02-15 23:00:02 +7)
        );
    }

    #[test]
    fn a_bad_calendar_line_is_named() {
        for (text, says) in [
            ("2026-13-01\tholiday\tx", "line 1"),
            (
                "# c\n2026-12-07\tworking\tx",
                "line 2: 2026-12-07 is a weekday",
            ),
            ("2026-12-07\toff\tx", "\"off\""),
            (
                "2026-12-07\tholiday\ta\n2026-12-07\tholiday\tb",
                "listed twice",
            ),
            ("# nothing\n", "lists no day"),
        ] {
            let e = Calendar::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn after_the_calendar_only_weekends_count() {
        let c = Calendar::parse("2025-01-01\tholiday\tNew Year").unwrap();
        assert_eq!(c.last_day().to_string(), "2025-12-31");
        // 1 January 2026 is not listed: a working Thursday.
        assert_eq!(
            vn(Within::WorkingDays(1).due(&c, datetime!(2025-12-31 09:00 +7))),
            datetime!(2026-01-02 00:00 +7)
        );
    }
}
