//! Times as RFC 3339 text (`2026-11-26T11:55:01Z`), through humantime, for messages, charts and
//! version names. humantime writes the years 1970 to 9999 only and fails the write beyond (a
//! panic in `to_string`), so a time from outside the process — a sample's, a model file's —
//! is clamped into that range first and prints as its edge.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second of the year 9999 (Unix seconds): the latest time anything from outside is
/// taken to mean.
pub const MAX_UNIX_SECS: i64 = 253_402_300_799;
const LAST_SECOND: u64 = MAX_UNIX_SECS as u64;

/// Whether `unix_secs` is a time from 1970 to 9999: what a timestamp read from outside must be
/// before sums and differences of it are taken.
pub fn in_range(unix_secs: i64) -> bool {
    (0..=MAX_UNIX_SECS).contains(&unix_secs)
}

/// Unix seconds to `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(unix_secs: i64) -> String {
    let secs = u64::try_from(unix_secs).unwrap_or(0).min(LAST_SECOND);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// A time to `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let t = t.clamp(UNIX_EPOCH, UNIX_EPOCH + Duration::from_secs(LAST_SECOND));
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_beyond_what_rfc3339_writes_print_as_its_edges() {
        assert!(in_range(0) && in_range(MAX_UNIX_SECS));
        assert!(!in_range(-1) && !in_range(MAX_UNIX_SECS + 1));
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_700_101), "2026-11-26T13:35:01Z");
        assert_eq!(rfc3339(-1), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        let far = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(rfc3339_millis(far), "9999-12-31T23:59:59.000Z");
    }
}
