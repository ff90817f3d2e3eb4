//! Timestamps serialized exactly as chrono serializes a `DateTime<Utc>` (RFC 3339, `Z`, the
//! fraction in 0, 3, 6 or 9 digits as needed), written into a stack buffer instead of through
//! `core::fmt`. Every task writes two records and three events, each with a timestamp, and
//! chrono's formatter was about 5% of a worker's CPU on no-op tasks. Years outside 0–9999 and
//! leap seconds go through chrono.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serializer;

/// The longest form: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX: usize = 30;

/// Writes `at` into `buf`; `None` when chrono must write it (a year outside 0–9999 or a leap
/// second).
fn write(at: &DateTime<Utc>, buf: &mut [u8; MAX]) -> Option<usize> {
    let (date, time) = (at.date_naive(), at.time());
    let year = u32::try_from(date.year()).ok().filter(|y| *y <= 9999)?;
    let nanos = time.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    let mut put = |at: usize, value: u32, digits: usize| {
        let mut v = value;
        for i in (0..digits).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year, 4);
    put(5, date.month(), 2);
    put(8, date.day(), 2);
    put(11, time.hour(), 2);
    put(14, time.minute(), 2);
    put(17, time.second(), 2);
    let (fraction, digits) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    let mut len = 19;
    if digits > 0 {
        put(20, fraction, digits);
        buf[19] = b'.';
        len = 20 + digits;
    }
    for (i, c) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')] {
        buf[i] = c;
    }
    buf[len] = b'Z';
    Some(len + 1)
}

/// `#[serde(serialize_with = "stamp::serialize")]` for a `DateTime<Utc>`.
pub(crate) fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; MAX];
    match write(at, &mut buf).and_then(|n| std::str::from_utf8(&buf[..n]).ok()) {
        Some(text) => s.serialize_str(text),
        None => serde::Serialize::serialize(at, s),
    }
}

/// `#[serde(serialize_with = "stamp::option")]` for an `Option<DateTime<Utc>>`.
pub(crate) fn option<S: Serializer>(at: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serialize(at, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, NaiveDate, TimeZone, Utc};
    use proptest::prelude::*;

    #[derive(serde::Serialize)]
    struct Ours(#[serde(serialize_with = "super::serialize")] DateTime<Utc>);

    fn both(at: DateTime<Utc>) -> (String, String) {
        let ours = serde_json::to_string(&Ours(at)).expect("ours");
        let chrono = serde_json::to_string(&at).expect("chrono");
        (ours, chrono)
    }

    proptest! {
        #[test]
        fn writes_what_chrono_writes(
            secs in -70_000_000_000i64..260_000_000_000i64,
            nanos in prop_oneof![
                Just(0u32),
                (0u32..1000).prop_map(|m| m * 1_000_000),
                (0u32..1_000_000).prop_map(|u| u * 1_000),
                0u32..1_000_000_000,
            ],
        ) {
            let at = Utc.timestamp_opt(secs, nanos).single().expect("a time");
            let (ours, chrono) = both(at);
            prop_assert_eq!(ours, chrono);
        }
    }

    #[test]
    fn edges_match_chrono() {
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .expect("a leap second")
            .and_utc();
        let cases = [
            Utc::now(),
            leap,
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
        ];
        for at in cases {
            let (ours, chrono) = both(at);
            assert_eq!(ours, chrono);
        }
        assert_eq!(
            both(Utc.with_ymd_and_hms(2026, 12, 1, 9, 5, 3).unwrap()).0,
            "\"2026-12-01T09:05:03Z\""
        );
    }
}
