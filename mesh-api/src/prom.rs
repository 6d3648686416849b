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

/// One sample: a series name, its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Every sample in Prometheus text or OpenMetrics; comments and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some(Sample {
                name: name.to_string(),
                labels: Default::default(),
                value: parse_value(value)?,
            });
        }
    };
    let mut labels = std::collections::BTreeMap::new();
    let mut chars = rest.char_indices().peekable();
    let end;
    loop {
        // A label name up to `=`, then a quoted value with `\\`, `\"` and `\n` escapes.
        while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
            chars.next();
        }
        let (start, c) = *chars.peek()?;
        if c == '}' {
            end = start + 1;
            break;
        }
        let eq = rest[start..].find('=')? + start;
        let key = rest[start..eq].trim().to_string();
        while chars.peek().is_some_and(|(i, _)| *i <= eq) {
            chars.next();
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.insert(key, value);
    }
    let value = rest[end..].split_whitespace().next()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value: parse_value(value)?,
    })
}

fn parse_value(v: &str) -> Option<f64> {
    let v = v.split_whitespace().next()?;
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => v.parse().ok(),
    }
}

/// Prometheus text format 0.0.4 from OpenMetrics text: without `# EOF` and `# UNIT`, and with
/// counters' `# TYPE`/`# HELP` naming the `_total` series, as that format wants.
pub fn openmetrics_to_text(om: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for l in om.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ")
            && let Some((name, "counter")) = rest.split_once(' ')
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = l
            .strip_prefix("# TYPE ")
            .map(|r| ("# TYPE ", r))
            .or_else(|| l.strip_prefix("# HELP ").map(|r| ("# HELP ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{kind}{name}_total {tail}\n"));
                } else {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes_and_special_values() {
        let text = "# TYPE x counter\nreq_total{a=\"1\",b=\"q\\\"x\\\\y,z}\"} 3\nplain 7.5\nh_bucket{le=\"+Inf\"} 4\nbroken{a=1} 2\n# EOF\n";
        let s = parse(text);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].name, "req_total");
        assert_eq!(s[0].label("b"), "q\"x\\y,z}");
        assert_eq!(s[0].value, 3.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("plain", 7.5));
        assert_eq!(s[2].label("le"), "+Inf");
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP r Requests.\n# TYPE r counter\nr_total{a=\"1\"} 2\n# HELP g A gauge.\n# TYPE g gauge\n# UNIT g seconds\ng 1\n# EOF\n";
        let text = openmetrics_to_text(om);
        assert_eq!(
            text,
            "# HELP r_total Requests.\n# TYPE r_total counter\nr_total{a=\"1\"} 2\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn series_are_matched_whole() {
        let text = "# HELP x y\nreq_total{a=\"1\"} 3\nreq_total 7\nreq_total_other 9\nroots 2\n";
        assert_eq!(sample(text, "req_total"), Some(7.0));
        assert_eq!(count(text, "req_total{a=\"1\"}"), 3);
        assert_eq!(count(text, "missing_total"), 0);
        assert_eq!(sample(text, "roots"), Some(2.0));
    }
}
