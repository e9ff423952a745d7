//! Time conversions between `std::time`, Unix milliseconds (how the services' SQLite tables
//! and state files store instants) and the protobuf well-known types the events carry. One
//! place, so every service rounds and saturates the same way: instants before the epoch read
//! as 0, values that do not fit saturate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`unix_ms`].
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Now, in milliseconds since the Unix epoch, as SQLite's signed integers store it.
pub fn now_ms() -> i64 {
    i64::try_from(unix_ms(SystemTime::now())).unwrap_or(i64::MAX)
}

/// Now, in whole seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    i64::try_from(unix_ms(SystemTime::now()) / 1000).unwrap_or(i64::MAX)
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// A protobuf timestamp of Unix milliseconds (negative ones too).
pub fn timestamp_from_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Unix milliseconds of a protobuf timestamp.
pub fn timestamp_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// A protobuf duration (saturating at `i64::MAX` seconds).
pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf duration in seconds (0 when absent).
pub fn duration_secs(d: Option<&prost_types::Duration>) -> f64 {
    d.map(|d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_ms_round_trips_and_saturates_before_the_epoch() {
        let t = from_unix_ms(1_700_000_000_123);
        assert_eq!(unix_ms(t), 1_700_000_000_123);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert!(now_ms() > 1_700_000_000_000);
        assert!((now_secs() - now_ms() / 1000).abs() <= 1);
    }

    #[test]
    fn protobuf_values_convert_both_ways() {
        let t = from_unix_ms(1_700_000_000_123);
        assert_eq!(timestamp_ms(&timestamp(t)), 1_700_000_000_123);
        for ms in [1_700_000_000_123, 0, -1, -1_500] {
            assert_eq!(timestamp_ms(&timestamp_from_ms(ms)), ms, "{ms}");
        }
        let before = timestamp_from_ms(-1_500);
        assert_eq!((before.seconds, before.nanos), (-2, 500_000_000));
        let d = duration(Duration::from_millis(2_500));
        assert_eq!((d.seconds, d.nanos), (2, 500_000_000));
        assert!((duration_secs(Some(&d)) - 2.5).abs() < 1e-9);
        assert_eq!(duration_secs(None), 0.0);
        assert_eq!(duration(Duration::MAX).seconds, i64::MAX);
    }
}
