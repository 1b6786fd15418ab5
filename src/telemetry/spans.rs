//! Trace spans on stderr (`--trace-stderr`): each span, as it ends, one
//! line beside the log, in its format, so that traces can be read without
//! a collector. The spans are the ones an OTLP collector receives (the same
//! provider makes both), with their trace and parent ids: a call's span
//! continues its client's trace, and a store commit's is its child.
//!
//! Text: `TIME  SPAN NAME trace_id=.. span_id=.. parent_span_id=..
//! kind=server duration_ms=0.42 status=unset ATTRIBUTE=VALUE ...` (no
//! `parent_span_id` for a root span, `status_description` after an error's
//! status). JSON: `{"timestamp":..,"span":NAME,"trace_id":..,"span_id":..,
//! "parent_span_id":..,"kind":..,"duration_ms":..,"status":..,
//! "status_description":..,"attributes":{..}}` (`null` for what a span
//! lacks).
//!
//! Each line goes out in one write to stderr, so it never interleaves with
//! a log line. The lines are written directly, not as `tracing` events: an
//! event made while the tracing layer is ending a span would be dropped.

use std::{
    fmt::Write as _,
    io::Write as _,
    time::{Duration, SystemTime},
};

use opentelemetry::{
    Value,
    trace::{SpanId, SpanKind, Status},
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SpanData, SpanExporter},
};

/// Writes every span it is handed to stderr, as text or as JSON.
#[derive(Debug)]
pub struct StderrSpans {
    json: bool,
}

impl StderrSpans {
    pub fn new(json: bool) -> Self {
        StderrSpans { json }
    }
}

impl SpanExporter for StderrSpans {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut lines = String::new();
        for span in &batch {
            if self.json {
                lines.push_str(&json_line(span));
            } else {
                lines.push_str(&text_line(span));
            }
            lines.push('\n');
        }
        // A span that cannot be shown is not worth failing anything for.
        let _ = std::io::stderr().lock().write_all(lines.as_bytes());
        Ok(())
    }
}

fn kind(kind: &SpanKind) -> &'static str {
    match kind {
        SpanKind::Client => "client",
        SpanKind::Server => "server",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
        SpanKind::Internal => "internal",
    }
}

/// The status's name, and the description of an error, if it has one.
fn status(status: &Status) -> (&'static str, Option<&str>) {
    match status {
        Status::Unset => ("unset", None),
        Status::Ok => ("ok", None),
        Status::Error { description } => ("error", Some(&**description).filter(|d| !d.is_empty())),
    }
}

/// The parent's id, or `None` for a root span.
fn parent(span: &SpanData) -> Option<String> {
    (span.parent_span_id != SpanId::INVALID).then(|| span.parent_span_id.to_string())
}

/// How long the span took, in milliseconds to the microsecond.
fn duration_ms(span: &SpanData) -> f64 {
    let took = span
        .end_time
        .duration_since(span.start_time)
        .unwrap_or(Duration::ZERO);
    took.as_micros() as f64 / 1000.0
}

fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

fn text_line(span: &SpanData) -> String {
    let context = &span.span_context;
    let mut line = format!(
        "{}  SPAN {} trace_id={} span_id={}",
        timestamp(span.end_time),
        span.name,
        context.trace_id(),
        context.span_id(),
    );
    if let Some(parent) = parent(span) {
        let _ = write!(line, " parent_span_id={parent}");
    }
    let (status, description) = status(&span.status);
    let _ = write!(
        line,
        " kind={} duration_ms={} status={status}",
        kind(&span.span_kind),
        duration_ms(span),
    );
    if let Some(description) = description {
        let _ = write!(line, " status_description={description:?}");
    }
    for attribute in &span.attributes {
        let _ = match &attribute.value {
            Value::String(text) => write!(line, " {}={:?}", attribute.key, text.as_str()),
            other => write!(line, " {}={other}", attribute.key),
        };
    }
    line
}

fn json_line(span: &SpanData) -> String {
    let context = &span.span_context;
    let (status, description) = status(&span.status);
    let attributes: serde_json::Map<String, serde_json::Value> = span
        .attributes
        .iter()
        .map(|attribute| {
            let value = match &attribute.value {
                Value::Bool(b) => serde_json::Value::from(*b),
                Value::I64(i) => serde_json::Value::from(*i),
                Value::F64(f) => serde_json::Value::from(*f),
                other => serde_json::Value::from(other.to_string()),
            };
            (attribute.key.to_string(), value)
        })
        .collect();
    serde_json::json!({
        "timestamp": timestamp(span.end_time),
        "span": span.name,
        "trace_id": context.trace_id().to_string(),
        "span_id": context.span_id().to_string(),
        "parent_span_id": parent(span),
        "kind": kind(&span.span_kind),
        "duration_ms": duration_ms(span),
        "status": status,
        "status_description": description,
        "attributes": attributes,
    })
    .to_string()
}
