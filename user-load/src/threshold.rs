//! `--fail-if`: conditions over the measured figures that fail a run, in
//! the spirit of k6's thresholds (`errors>1%`, `p99>10ms`, `rate<5000`).

use std::{fmt, time::Duration};

use serde::Serialize;

use crate::stats::Latency;

/// A figure of the report a condition can name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metric {
    /// Failed calls, as a count.
    Errors,
    /// Failed calls, as a share of all calls, in percent.
    ErrorShare,
    /// A figure of the report's first latency.
    Latency(LatencyFigure),
    /// The report's throughput per second.
    Rate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyFigure {
    P50,
    P90,
    P95,
    P99,
    P999,
    Max,
    Mean,
}

impl LatencyFigure {
    fn of(self, latency: &Latency) -> f64 {
        match self {
            LatencyFigure::P50 => latency.p50_ms,
            LatencyFigure::P90 => latency.p90_ms,
            LatencyFigure::P95 => latency.p95_ms,
            LatencyFigure::P99 => latency.p99_ms,
            LatencyFigure::P999 => latency.p999_ms,
            LatencyFigure::Max => latency.max_ms,
            LatencyFigure::Mean => latency.mean_ms,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Above,
    AtLeast,
    Below,
    AtMost,
}

impl Op {
    fn holds(self, actual: f64, limit: f64) -> bool {
        match self {
            Op::Above => actual > limit,
            Op::AtLeast => actual >= limit,
            Op::Below => actual < limit,
            Op::AtMost => actual <= limit,
        }
    }
}

/// One `--fail-if` condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// As the user wrote it.
    pub text: String,
    pub metric: Metric,
    pub op: Op,
    /// In the metric's unit: calls, percent, milliseconds or per second.
    pub limit: f64,
}

/// The figures a condition is checked against.
pub struct Figures<'a> {
    pub calls: u64,
    pub failed: u64,
    /// `None` when nothing was timed.
    pub latency: Option<&'a Latency>,
    pub rate: f64,
}

/// A condition checked after the run.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub condition: String,
    /// The measured value, in the condition's unit.
    pub actual: Option<f64>,
    /// Whether the condition held, failing the run.
    pub failed: bool,
}

impl Threshold {
    /// Parses `METRIC OP VALUE`, e.g. `errors>1%`, `p99 > 10ms`, `rate<5000`.
    pub fn parse(text: &str) -> Result<Threshold, String> {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let at = compact
            .find(['<', '>'])
            .ok_or_else(|| format!("{text:?}: expected METRIC OP VALUE, e.g. p99>10ms"))?;
        let (name, rest) = compact.split_at(at);
        let (op, value) = if let Some(v) = rest.strip_prefix(">=") {
            (Op::AtLeast, v)
        } else if let Some(v) = rest.strip_prefix("<=") {
            (Op::AtMost, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (Op::Above, v)
        } else {
            (Op::Below, &rest[1..])
        };
        let number = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("{text:?}: {v:?} is not a number"))
        };
        let (metric, limit) = match name {
            "errors" => match value.strip_suffix('%') {
                Some(share) => (Metric::ErrorShare, number(share)?),
                None => (Metric::Errors, number(value)?),
            },
            "rate" => (Metric::Rate, number(value)?),
            "mean" | "max" | "p50" | "p90" | "p95" | "p99" | "p99.9" => {
                let figure = match name {
                    "mean" => LatencyFigure::Mean,
                    "max" => LatencyFigure::Max,
                    "p50" => LatencyFigure::P50,
                    "p90" => LatencyFigure::P90,
                    "p95" => LatencyFigure::P95,
                    "p99" => LatencyFigure::P99,
                    _ => LatencyFigure::P999,
                };
                (Metric::Latency(figure), latency_ms(text, value)?)
            }
            _ => {
                return Err(format!(
                    "{text:?}: unknown figure {name:?} (errors, p50, p90, p95, p99, p99.9, \
                     max, mean, rate)"
                ));
            }
        };
        Ok(Threshold {
            text: text.trim().to_owned(),
            metric,
            op,
            limit,
        })
    }

    /// Checks the condition; it holds (and fails the run) when the figure
    /// is on the wrong side, or cannot be measured at all.
    pub fn check(&self, figures: &Figures<'_>) -> Verdict {
        let actual = match self.metric {
            Metric::Errors => Some(figures.failed as f64),
            Metric::ErrorShare => {
                (figures.calls > 0).then(|| 100.0 * figures.failed as f64 / figures.calls as f64)
            }
            Metric::Latency(figure) => figures.latency.map(|l| figure.of(l)),
            Metric::Rate => Some(figures.rate),
        };
        Verdict {
            condition: self.text.clone(),
            actual,
            failed: actual.is_none_or(|actual| self.op.holds(actual, self.limit)),
        }
    }
}

/// `10ms`, `250us`, `1.5s` in milliseconds; a unit is required, so that
/// `p99>10` cannot mean seconds to one reader and milliseconds to another.
fn latency_ms(text: &str, value: &str) -> Result<f64, String> {
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?}: give a unit (us, ms or s), e.g. 10ms"))?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (us, ms or s)")),
    };
    Ok(Duration::from_secs_f64(seconds).as_secs_f64() * 1e3)
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let actual = match self.actual {
            Some(actual) => format!("{actual:.3}"),
            None => "not measured".to_owned(),
        };
        let outcome = if self.failed { "FAILED" } else { "ok" };
        write!(f, "{}: {actual}, {outcome}", self.condition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p99_ms: f64) -> Latency {
        Latency {
            count: 1000,
            mean_ms: 1.0,
            p50_ms: 1.0,
            p90_ms: 2.0,
            p95_ms: 3.0,
            p99_ms,
            p999_ms: p99_ms,
            max_ms: p99_ms,
        }
    }

    #[test]
    fn conditions_parse_in_the_documented_forms() {
        let t = Threshold::parse("errors>1%").unwrap();
        assert_eq!(
            (t.metric, t.op, t.limit),
            (Metric::ErrorShare, Op::Above, 1.0)
        );
        let t = Threshold::parse("errors >= 10").unwrap();
        assert_eq!(
            (t.metric, t.op, t.limit),
            (Metric::Errors, Op::AtLeast, 10.0)
        );
        let t = Threshold::parse("p99>10ms").unwrap();
        assert_eq!(
            (t.metric, t.limit),
            (Metric::Latency(LatencyFigure::P99), 10.0)
        );
        let t = Threshold::parse("p99.9 > 250us").unwrap();
        assert_eq!(
            (t.metric, t.limit),
            (Metric::Latency(LatencyFigure::P999), 0.25)
        );
        let t = Threshold::parse("max>1.5s").unwrap();
        assert_eq!(
            (t.metric, t.limit),
            (Metric::Latency(LatencyFigure::Max), 1500.0)
        );
        let t = Threshold::parse("rate<5000").unwrap();
        assert_eq!((t.metric, t.op, t.limit), (Metric::Rate, Op::Below, 5000.0));
        for bad in [
            "p99>10",
            "p98>1ms",
            "errors",
            "errors>x",
            "rate<-1",
            "p99>10 parsecs",
        ] {
            assert!(Threshold::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_condition_that_holds_fails_the_run() {
        let latency = latency(12.0);
        let f = Figures {
            calls: 1000,
            failed: 20,
            latency: Some(&latency),
            rate: 900.0,
        };
        let check = |text: &str| Threshold::parse(text).unwrap().check(&f).failed;
        assert!(check("errors>1%"));
        assert!(!check("errors>5%"));
        assert!(check("errors>=20"));
        assert!(!check("errors>20"));
        assert!(check("p99>10ms"));
        assert!(!check("p99>20ms"));
        assert!(check("rate<1000"));
        assert!(!check("rate<500"));
    }

    #[test]
    fn a_figure_that_was_not_measured_fails_the_run() {
        let f = Figures {
            calls: 0,
            failed: 0,
            latency: None,
            rate: 0.0,
        };
        assert!(Threshold::parse("p99>10ms").unwrap().check(&f).failed);
        assert!(Threshold::parse("errors>1%").unwrap().check(&f).failed);
    }
}
