//! Freeze windows: `HH:MM-HH:MM` in an IANA time zone on chosen ISO weekdays (1 = Monday).
//!
//! Windows are wall-clock times in their zone:
//! - a window *starts* on each listed weekday at `from` and ends at `to` the same day, or the
//!   next day when `to <= from` (it crosses midnight; `from == to` means 24 hours);
//! - an empty weekday list means every day;
//! - on a day a DST change skips an hour, wall-clock times inside the gap never happen, so a
//!   window lying entirely in the gap does not happen that day, and a window spanning the gap is
//!   one hour shorter in real time; on a day an hour repeats, the repeated times are inside the
//!   window both times (a 01:00-02:00 window lasts two real hours).

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use taskbus_proto::pool::{parse_hhmm, FreezeWindow};

/// A freeze window, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    from: u32,
    to: u32,
    tz: Tz,
    /// Bit `d` set = the window starts on ISO weekday `d` (1..=7).
    days: u8,
}

/// Why a window cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FreezeError {
    #[error("freeze window time {0:?} is not HH:MM (00:00 to 23:59)")]
    Time(String),
    #[error("freeze window time zone {0:?} is not an IANA time zone such as Europe/Berlin")]
    Zone(String),
    #[error("freeze window weekday {0} is not 1 (Monday) to 7 (Sunday)")]
    Weekday(u8),
}

impl Window {
    pub fn parse(w: &FreezeWindow) -> Result<Self, FreezeError> {
        let from = parse_hhmm(&w.from).ok_or_else(|| FreezeError::Time(w.from.clone()))?;
        let to = parse_hhmm(&w.to).ok_or_else(|| FreezeError::Time(w.to.clone()))?;
        let tz: Tz = w.tz.parse().map_err(|_| FreezeError::Zone(w.tz.clone()))?;
        let mut days = 0u8;
        for &d in &w.weekdays {
            if !(1..=7).contains(&d) {
                return Err(FreezeError::Weekday(d));
            }
            days |= 1 << d;
        }
        if days == 0 {
            days = 0b1111_1110;
        }
        Ok(Self { from, to, tz, days })
    }

    fn starts_on(&self, iso_weekday: u32) -> bool {
        self.days & (1 << iso_weekday) != 0
    }

    /// Whether `at` lies inside the window.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        let local = at.with_timezone(&self.tz);
        let minute = local.hour() * 60 + local.minute();
        let today = local.weekday().number_from_monday();
        let yesterday = if today == 1 { 7 } else { today - 1 };
        if self.from < self.to {
            self.starts_on(today) && (self.from..self.to).contains(&minute)
        } else {
            (self.starts_on(today) && minute >= self.from)
                || (self.starts_on(yesterday) && minute < self.to)
        }
    }
}

/// Parse every window of a pool.
pub fn parse_all(ws: &[FreezeWindow]) -> Result<Vec<Window>, FreezeError> {
    ws.iter().map(Window::parse).collect()
}

/// Whether any window contains `at`.
pub fn frozen(ws: &[Window], at: DateTime<Utc>) -> bool {
    ws.iter().any(|w| w.contains(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(from: &str, to: &str, tz: &str, days: &[u8]) -> Window {
        Window::parse(&FreezeWindow {
            from: from.into(),
            to: to.into(),
            tz: tz.into(),
            weekdays: days.to_vec(),
        })
        .unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn windows_table() {
        // 2026-11-23 is a Monday; 2026-11-27 Friday; 2026-11-28 Saturday.
        let weekdays = [1, 2, 3, 4, 5];
        let table: &[(Window, &str, bool)] = &[
            (
                w("09:00", "17:00", "UTC", &[]),
                "2026-11-22T09:00:00Z",
                true,
            ),
            (
                w("09:00", "17:00", "UTC", &[]),
                "2026-11-22T16:59:59Z",
                true,
            ),
            (
                w("09:00", "17:00", "UTC", &[]),
                "2026-11-22T17:00:00Z",
                false,
            ),
            (
                w("09:00", "17:00", "UTC", &[]),
                "2026-11-22T08:59:59Z",
                false,
            ),
            // Crossing midnight, weekdays only: starts Friday 23:00 and runs into Saturday.
            (
                w("23:00", "02:00", "UTC", &weekdays),
                "2026-11-27T23:30:00Z",
                true,
            ),
            (
                w("23:00", "02:00", "UTC", &weekdays),
                "2026-11-28T01:59:00Z",
                true,
            ),
            (
                w("23:00", "02:00", "UTC", &weekdays),
                "2026-11-28T02:00:00Z",
                false,
            ),
            // Saturday evening: no window starts on Saturday.
            (
                w("23:00", "02:00", "UTC", &weekdays),
                "2026-11-28T23:30:00Z",
                false,
            ),
            // Monday 01:00 belongs to a window that would have started on Sunday: not listed.
            (
                w("23:00", "02:00", "UTC", &weekdays),
                "2026-11-23T01:00:00Z",
                false,
            ),
            // Monday 23:30 starts Monday's window.
            (
                w("23:00", "02:00", "UTC", &weekdays),
                "2026-11-23T23:30:00Z",
                true,
            ),
            // Sunday night window (7) carries into Monday morning.
            (
                w("22:00", "06:00", "UTC", &[7]),
                "2026-11-23T05:00:00Z",
                true,
            ),
            (
                w("22:00", "06:00", "UTC", &[7]),
                "2026-11-24T05:00:00Z",
                false,
            ),
            // Time zones: 09:00-17:00 Berlin (UTC+1 in November) = 08:00-16:00 UTC.
            (
                w("09:00", "17:00", "Europe/Berlin", &[]),
                "2026-11-23T08:00:00Z",
                true,
            ),
            (
                w("09:00", "17:00", "Europe/Berlin", &[]),
                "2026-11-23T07:59:00Z",
                false,
            ),
            (
                w("09:00", "17:00", "Europe/Berlin", &[]),
                "2026-11-23T16:00:00Z",
                false,
            ),
            // Weekday is the local one: Monday 00:30 in Tokyo is Sunday 15:30 UTC.
            (
                w("00:00", "01:00", "Asia/Tokyo", &[1]),
                "2026-11-22T15:30:00Z",
                true,
            ),
            (
                w("00:00", "01:00", "Asia/Tokyo", &[1]),
                "2026-11-23T15:30:00Z",
                false,
            ),
            // from == to: the whole day from that minute.
            (
                w("06:00", "06:00", "UTC", &[1]),
                "2026-11-24T05:59:00Z",
                true,
            ),
            (
                w("06:00", "06:00", "UTC", &[1]),
                "2026-11-24T06:00:00Z",
                false,
            ),
            (
                w("00:00", "00:00", "UTC", &[]),
                "2026-11-24T12:00:00Z",
                true,
            ),
        ];
        for (i, (win, at, want)) in table.iter().enumerate() {
            assert_eq!(win.contains(utc(at)), *want, "row {i}: {win:?} at {at}");
        }
    }

    #[test]
    fn dst_days() {
        // Europe/Berlin springs forward 2026-03-29 02:00 → 03:00 (UTC 01:00).
        let gap = w("02:00", "02:30", "Europe/Berlin", &[]);
        // 00:59:59 UTC = 01:59:59 CET; 01:00 UTC = 03:00 CEST: 02:00-02:30 never happens that day.
        for t in [
            "2026-03-29T00:59:59Z",
            "2026-03-29T01:00:00Z",
            "2026-03-29T01:15:00Z",
        ] {
            assert!(!gap.contains(utc(t)), "{t}");
        }
        // The day after it happens again (CEST: 02:10 local = 00:10 UTC).
        assert!(gap.contains(utc("2026-03-30T00:10:00Z")));
        // A window spanning the gap is one real hour shorter: 01:30-03:30 local.
        let span = w("01:30", "03:30", "Europe/Berlin", &[]);
        assert!(span.contains(utc("2026-03-29T00:30:00Z"))); // 01:30 CET
        assert!(span.contains(utc("2026-03-29T01:29:00Z"))); // 03:29 CEST
        assert!(!span.contains(utc("2026-03-29T01:30:00Z"))); // 03:30 CEST
                                                              // Falling back 2026-10-25 03:00 CEST → 02:00 CET: 02:xx happens twice, both frozen.
        let rep = w("02:00", "03:00", "Europe/Berlin", &[]);
        assert!(rep.contains(utc("2026-10-25T00:30:00Z"))); // 02:30 CEST
        assert!(rep.contains(utc("2026-10-25T01:30:00Z"))); // 02:30 CET
        assert!(!rep.contains(utc("2026-10-25T02:00:00Z"))); // 03:00 CET
                                                             // A midnight-crossing window on the US spring-forward night (2026-03-08, New York).
        let night = w("23:00", "03:00", "America/New_York", &[6]); // Saturday 23:00 → Sunday 03:00
        assert!(night.contains(utc("2026-03-08T04:30:00Z"))); // Sat 23:30 EST
        assert!(night.contains(utc("2026-03-08T06:59:00Z"))); // Sun 01:59 EST
        assert!(!night.contains(utc("2026-03-08T07:00:00Z"))); // Sun 03:00 EDT, window over
        assert!(night.contains(utc("2026-03-08T04:00:00Z"))); // Sat 23:00 EST
        assert!(!night.contains(utc("2026-03-08T03:59:00Z"))); // Sat 22:59 EST
    }

    #[test]
    fn hostile_windows() {
        let bad = [
            (
                "24:00",
                "01:00",
                "UTC",
                vec![],
                FreezeError::Time("24:00".into()),
            ),
            (
                "9:00",
                "10:00",
                "UTC",
                vec![],
                FreezeError::Time("9:00".into()),
            ),
            (
                "09:00",
                "10:60",
                "UTC",
                vec![],
                FreezeError::Time("10:60".into()),
            ),
            (
                "-1:00",
                "10:00",
                "UTC",
                vec![],
                FreezeError::Time("-1:00".into()),
            ),
            (
                "09:00",
                "10:00",
                "Mars/Olympus",
                vec![],
                FreezeError::Zone("Mars/Olympus".into()),
            ),
            ("09:00", "10:00", "", vec![], FreezeError::Zone("".into())),
            ("09:00", "10:00", "UTC", vec![0], FreezeError::Weekday(0)),
            ("09:00", "10:00", "UTC", vec![8], FreezeError::Weekday(8)),
        ];
        for (from, to, tz, days, want) in bad {
            let got = Window::parse(&FreezeWindow {
                from: from.into(),
                to: to.into(),
                tz: tz.into(),
                weekdays: days,
            });
            assert_eq!(got, Err(want.clone()));
            assert!(!want.to_string().is_empty());
        }
        let ws = parse_all(&[]).unwrap();
        assert!(!frozen(&ws, Utc::now()));
    }

    /// The same rule written as "is the local wall-clock time inside one of the window's
    /// instances", each instance a [start, end) pair of naive local date-times.
    fn reference(from: u32, to: u32, days: &[u8], tz: Tz, at: DateTime<Utc>) -> bool {
        use chrono::{Duration, NaiveTime};
        let local = at.with_timezone(&tz).naive_local();
        let t = |m: u32| NaiveTime::from_hms_opt(m / 60, m % 60, 0).unwrap();
        (0..=1).any(|back| {
            let day = local.date() - Duration::days(back);
            let wd = day.weekday().number_from_monday() as u8;
            if !days.is_empty() && !days.contains(&wd) {
                return false;
            }
            let start = day.and_time(t(from));
            let end_day = if to > from {
                day
            } else {
                day + Duration::days(1)
            };
            let end = end_day.and_time(t(to));
            start <= local && local < end
        })
    }

    proptest::proptest! {
        #[test]
        fn matches_the_reference(
            from in 0u32..1440,
            to in 0u32..1440,
            days in proptest::collection::vec(1u8..=7, 0..4),
            zone in 0usize..4,
            secs in 1_700_000_000i64..1_900_000_000,
        ) {
            let tz = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"][zone];
            let hhmm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
            let win = w(&hhmm(from), &hhmm(to), tz, &days);
            let at = DateTime::<Utc>::from_timestamp(secs, 0).unwrap();
            proptest::prop_assert_eq!(win.contains(at), reference(from, to, &days, tz.parse().unwrap(), at));
        }
    }
}
