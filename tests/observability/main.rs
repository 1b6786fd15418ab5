//! Metrics and traces as operators' tools see them: the exact counts after
//! a known set of calls (errors, a cancelled stream, a deadline, a stream
//! ended by shutdown), the exposition checked by `promtool`, a real
//! Prometheus scraping the server, and the span of a call received by an
//! OTLP collector, continuing the client's trace.
mod access;
mod metrics;
mod prometheus;
mod traces;

use std::collections::HashMap;

/// One sample of the exposition: the metric name and its labels, sorted.
pub type Series = (String, Vec<(String, String)>);

/// Parses the Prometheus text format: every sample, by name and labels.
pub fn parse(text: &str) -> HashMap<Series, f64> {
    let mut samples = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut labels: Vec<(String, String)> = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("a label");
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        labels.sort();
        samples.insert((name.to_owned(), labels), value.parse().expect("a number"));
    }
    samples
}

pub fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut labels: Vec<_> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    labels
}
