//! Reading Prometheus text: what status commands and tests need from `/metrics`.

/// The value of one series, named exactly as it appears (`name` or `name{labels}`).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A counter's value, 0 when the series is absent (counters start there).
pub fn count(text: &str, series: &str) -> u64 {
    sample(text, series).map_or(0, |v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_matched_whole() {
        let text = "# HELP x y\nreq_total{a=\"1\"} 3\nreq_total 7\nreq_total_other 9\nroots 2\n";
        assert_eq!(sample(text, "req_total"), Some(7.0));
        assert_eq!(count(text, "req_total{a=\"1\"}"), 3);
        assert_eq!(count(text, "missing_total"), 0);
        assert_eq!(sample(text, "roots"), Some(2.0));
    }
}
