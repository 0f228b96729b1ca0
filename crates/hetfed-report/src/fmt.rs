//! Text formatting: HTML escaping, numbers, bytes, durations and timestamps.

/// Escapes a string for HTML text and attribute values (double- or single-quoted).
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab/newline have no business in a report.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A number with about four significant digits, trailing zeros trimmed (`61.2`, `0.5312`, `120`).
pub(crate) fn num(v: f64) -> String {
    if !v.is_finite() {
        return "—".to_string();
    }
    if v == 0.0 {
        return "0".to_string();
    }
    let a = v.abs();
    if !(1e-3..1e7).contains(&a) {
        return format!("{v:.3e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    trim_zeros(format!("{v:.decimals$}"))
}

/// A signed change: `+1.8`, `−2.3`, `0`.
pub(crate) fn signed(v: f64) -> String {
    if !v.is_finite() {
        return "—".to_string();
    }
    let s = num(v.abs());
    if s == "0" {
        s
    } else if v > 0.0 {
        format!("+{s}")
    } else {
        format!("\u{2212}{s}")
    }
}

fn trim_zeros(s: String) -> String {
    if s.contains('.') && !s.contains('e') {
        let t = s.trim_end_matches('0').trim_end_matches('.');
        if t == "-0" {
            return "0".to_string();
        }
        t.to_string()
    } else {
        s
    }
}

/// An integer with thousands separators: `1,234,567`.
pub(crate) fn grouped(v: f64) -> String {
    if !v.is_finite() {
        return "—".to_string();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if v < 0.0 && digits != "0" {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) const BYTE_UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// Binary unit index for a byte count: 0 = B, 1 = KiB, ...
pub(crate) fn byte_unit(v: f64) -> usize {
    let mut k = 0;
    let mut x = v.abs();
    while x >= 1024.0 && k < BYTE_UNITS.len() - 1 {
        x /= 1024.0;
        k += 1;
    }
    k
}

/// A byte count in binary units with three significant digits: `512 B`, `1.18 MiB`, `118 MiB`.
pub(crate) fn bytes(v: f64) -> String {
    if !v.is_finite() {
        return "—".to_string();
    }
    let k = byte_unit(v);
    if k == 0 {
        return format!("{v:.0} B");
    }
    let x = v / 1024f64.powi(k as i32);
    let d = if x.abs() < 10.0 {
        2
    } else if x.abs() < 100.0 {
        1
    } else {
        0
    };
    format!("{x:.d$} {}", BYTE_UNITS[k])
}

/// A duration: `0.42 s`, `12.3 s`, `5 min 02 s`, `1 h 02 min`.
pub(crate) fn secs(v: f64) -> String {
    if !v.is_finite() {
        return "—".to_string();
    }
    if v.abs() < 10.0 {
        format!("{v:.2} s")
    } else if v.abs() < 60.0 {
        format!("{v:.1} s")
    } else if v < 3600.0 {
        let t = v.round() as u64;
        format!("{} min {:02} s", t / 60, t % 60)
    } else {
        let t = (v / 60.0).round() as u64;
        format!("{} h {:02} min", t / 60, t % 60)
    }
}

/// A Unix time in milliseconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn utc(ms: f64) -> String {
    if !ms.is_finite() {
        return "—".to_string();
    }
    let secs = (ms / 1000.0).floor() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_that_matters() {
        assert_eq!(
            esc(r#"<script>alert("x&'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(esc("a\u{0}b"), "a\u{fffd}b");
    }

    #[test]
    fn numbers() {
        assert_eq!(num(61.2), "61.2");
        assert_eq!(num(55.0), "55");
        assert_eq!(num(0.53), "0.53");
        assert_eq!(num(0.123456), "0.1235");
        assert_eq!(num(12345.0), "12345");
        assert_eq!(num(-0.00001), "-1.000e-5");
        assert_eq!(num(f64::NAN), "—");
        assert_eq!(num(-0.00004 + 0.00004), "0");
        assert_eq!(signed(1.8), "+1.8");
        assert_eq!(signed(-2.25), "\u{2212}2.25");
        assert_eq!(grouped(1234567.0), "1,234,567");
        assert_eq!(grouped(123.0), "123");
        assert_eq!(grouped(-1000.0), "-1,000");
    }

    #[test]
    fn byte_counts() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1024.0), "1.00 KiB");
        assert_eq!(bytes(7_000_000.0), "6.68 MiB");
        assert_eq!(bytes(123_456_789.0), "118 MiB");
        assert_eq!(bytes(3.5 * 1024.0 * 1024.0 * 1024.0), "3.50 GiB");
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(secs(0.4), "0.40 s");
        assert_eq!(secs(40.2), "40.2 s");
        assert_eq!(secs(300.0), "5 min 00 s");
        assert_eq!(secs(3725.0), "1 h 02 min");
        assert_eq!(utc(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_714_564_800_000.0), "2024-05-01 12:00:00 UTC");
        assert_eq!(utc(951_782_400_000.0), "2000-02-29 00:00:00 UTC");
    }
}
