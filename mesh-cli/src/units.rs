//! Numbers for people: bytes, rates, durations, times.

use std::time::{SystemTime, UNIX_EPOCH};

/// `1.50 MiB`, `512 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

/// `1.50 MiB/s`; `-` when unknown.
pub fn rate(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r < 0.5 => "0 B/s".into(),
        Some(r) => format!("{}/s", bytes(r.round() as u64)),
    }
}

/// `850ms`, `4.2s`, `3m05s`, `2h03m`, `3d04h`.
pub fn age_ms(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// Seconds since the epoch, now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2025-11-25 08:12:00 UTC`.
pub fn timestamp(unix: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(unix.min(i64::MAX as u64) as i64) else {
        return format!("@{unix}");
    };
    let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    t.format(&f).unwrap_or_else(|_| format!("@{unix}"))
}

/// `in 11h58m`, `3m05s ago`, relative to `now`.
pub fn relative(unix: u64, now: u64) -> String {
    if unix >= now {
        format!("in {}", age_ms((unix - now) * 1000))
    } else {
        format!("{} ago", age_ms((now - unix) * 1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humane_numbers() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(64 << 20), "64.00 MiB");
        assert_eq!(rate(None), "-");
        assert_eq!(rate(Some(0.1)), "0 B/s");
        assert_eq!(rate(Some(2048.0)), "2.00 KiB/s");
        assert_eq!(age_ms(850), "850ms");
        assert_eq!(age_ms(4_250), "4.2s");
        assert_eq!(age_ms(185_000), "3m05s");
        assert_eq!(age_ms(7_380_000), "2h03m");
        assert_eq!(age_ms(273_600_000), "3d04h");
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(timestamp(1_764_058_320), "2025-11-25 08:12:00 UTC");
        assert_eq!(relative(160, 100), "in 1m00s");
        assert_eq!(relative(100, 160), "1m00s ago");
    }
}
