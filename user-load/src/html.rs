//! `--html PATH`: the report as one self-contained page: the parameters,
//! totals and status counts as tables, and charts drawn by plotters as
//! inline SVG. The page fetches nothing when viewed: no script, no link, and
//! a Content-Security-Policy that blocks any load, so a page that tried
//! would show it in the browser's console.

use std::{fmt::Write as _, path::Path};

use plotters::{coord::Shift, prelude::*};

use crate::{
    cli::Mode,
    report::{Report, codes, outages},
    series::Point,
    stats::{Bucket, Latency},
};

/// Size of each chart, in pixels.
const CHART_SIZE: (u32, u32) = (960, 300);

const OK_COLOUR: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
const FAILED_COLOUR: RGBColor = RGBColor(0xc0, 0x39, 0x2b);
const P50_COLOUR: RGBColor = RGBColor(0x27, 0xae, 0x60);
const P99_COLOUR: RGBColor = RGBColor(0x8e, 0x44, 0xad);
const WARMUP_COLOUR: RGBColor = RGBColor(0xee, 0xee, 0xee);

const STYLE: &str = "body{font-family:sans-serif;max-width:1000px;margin:1em auto;color:#222}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;\
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.ok{color:#1e7b34}.failed{color:#b00020}p.note{color:#555;font-size:.9em}h2{margin-top:1.5em}";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes the page for `report` to `path`.
pub fn write(report: &Report, path: &Path) -> std::io::Result<()> {
    std::fs::write(path, page(report))
}

fn row(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "<tr><th>{}</th><td>{}</td></tr>",
        escape(name),
        escape(&value.to_string())
    );
}

fn latency_table(out: &mut String, latency: &Latency) {
    let _ = writeln!(
        out,
        "<table class=\"latency\"><tr><th>n</th><th>mean</th><th>p50</th><th>p90</th>\
         <th>p95</th><th>p99</th><th>p99.9</th><th>max</th></tr><tr><td class=n>{}</td>{}</tr></table>",
        latency.count,
        [
            latency.mean_ms,
            latency.p50_ms,
            latency.p90_ms,
            latency.p95_ms,
            latency.p99_ms,
            latency.p999_ms,
            latency.max_ms
        ]
        .iter()
        .map(|ms| format!("<td class=n>{ms:.3} ms</td>"))
        .collect::<String>()
    );
}

/// The whole page.
pub fn page(report: &Report) -> String {
    let m = &report.measures;
    let mut out = String::new();
    let title = format!("user-load {} against {}", report.mode.name(), report.addr);
    let _ = writeln!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'\"><title>{}</title><style>{STYLE}</style></head><body>",
        escape(&title)
    );
    let _ = writeln!(out, "<h1>{}</h1>", escape(&title));
    let class = if report.exit_code == 0 {
        "ok"
    } else {
        "failed"
    };
    let _ = writeln!(
        out,
        "<p id=\"result\" class=\"{class}\"><strong>Result: {}</strong> (exit status {})</p>",
        escape(&report.result()),
        report.exit_code
    );

    out.push_str("<h2>Parameters</h2><table id=\"parameters\">");
    row(&mut out, "command", &report.command);
    row(&mut out, "targets", &report.addr);
    row(&mut out, "connections", report.connections);
    let concurrency = match report.mode {
        Mode::Add | Mode::Get => "workers",
        Mode::List => "scanners",
        Mode::Bulk => "streams at a time",
        Mode::Sync => "upserts in flight (one stream)",
    };
    row(&mut out, concurrency, report.concurrency);
    if report.mode == Mode::Sync {
        row(&mut out, "watcher streams", report.watchers);
    }
    row(
        &mut out,
        "pacing",
        report.schedule.as_deref().unwrap_or("closed loop"),
    );
    row(&mut out, "warm-up", format!("{:.3} s", report.warmup_s));
    row(&mut out, "started", &report.started_at);
    if report.generators > 1 {
        row(&mut out, "generators (reports merged)", report.generators);
    }
    out.push_str("</table>\n");

    out.push_str("<h2>Totals</h2><table id=\"totals\">");
    row(
        &mut out,
        "measured duration",
        format!("{:.3} s", report.duration_s),
    );
    row(&mut out, m.calls, report.calls);
    row(&mut out, &format!("OK {}", m.calls), report.ok_calls);
    row(
        &mut out,
        &format!("failed {}", m.calls),
        report.failed_calls,
    );
    row(&mut out, "throughput", report.throughput_line());
    if report.mode == Mode::Bulk {
        row(&mut out, "rows added", report.rows_added);
        row(&mut out, "rows failed", report.rows_failed);
        row(
            &mut out,
            "rows sent on streams that ended without a reply",
            report.rows_unconfirmed,
        );
        if let Some(streams) = &report.streams {
            row(
                &mut out,
                "streams",
                format!("{} ({})", streams.count, codes(&streams.codes)),
            );
        }
    } else {
        row(&mut out, "users", report.users);
    }
    row(&mut out, "MB/s", format!("{:.2}", report.mb_per_s));
    row(
        &mut out,
        &format!("{} with no answer (the connection failed)", m.calls),
        report.connection_failures,
    );
    row(
        &mut out,
        "generator CPU",
        format!(
            "{:.2} s ({:.2} cores){}",
            report.generator_cpu_s,
            report.generator_cores,
            report
                .pacer_cpu_s
                .map(|s| format!(", of which the pacer thread {s:.2} s"))
                .unwrap_or_default()
        ),
    );
    if let Some(verify) = &report.verify {
        row(
            &mut out,
            "verify",
            format!("{}: {}", verify.outcome(), verify.detail),
        );
    }
    out.push_str("</table>\n");

    let _ = writeln!(
        out,
        "<h2>Status codes</h2><p class=note>Of the {} that got an answer{}.</p>\
         <table id=\"codes\"><tr><th>code</th><th>count</th></tr>",
        m.calls,
        if report.mode == Mode::Bulk {
            "; NOT_LISTED: failed rows a stream's reply did not list (it lists 100)"
        } else {
            ""
        }
    );
    for (code, n) in &report.codes {
        let _ = writeln!(out, "<tr><td>{code}</td><td class=n>{n}</td></tr>");
    }
    for (code, n) in &report.streams_aborted {
        let _ = writeln!(
            out,
            "<tr><td>stream aborted: {code}</td><td class=n>{n}</td></tr>"
        );
    }
    out.push_str("</table>\n");

    if !report.failures.is_empty() || !report.thresholds.is_empty() {
        out.push_str("<h2>Verdict</h2><ul>");
        for failure in &report.failures {
            let _ = writeln!(out, "<li class=failed>{}</li>", escape(failure));
        }
        for verdict in &report.thresholds {
            let class = if verdict.failed { "failed" } else { "ok" };
            let _ = writeln!(
                out,
                "<li class={class}>--fail-if {}</li>",
                escape(&verdict.to_string())
            );
        }
        out.push_str("</ul>\n");
    }

    if let Some(latency) = &report.latency {
        let name = if report.mode == Mode::Bulk {
            "Batches"
        } else {
            "Latency"
        };
        let _ = writeln!(
            out,
            "<h2>{name}</h2><p class=note>{}</p>",
            escape(m.latency)
        );
        latency_table(&mut out, latency);
        out.push_str(&histogram_svg(&report.latency_buckets, latency, "latency"));
    }
    if let (Some(lateness), Some(measures)) = (&report.lateness, m.lateness) {
        let _ = writeln!(
            out,
            "<h2>Lateness</h2><p class=note>{}</p>",
            escape(measures)
        );
        latency_table(&mut out, lateness);
    }
    if let Some(warning) = &report.lateness_warning {
        let _ = writeln!(
            out,
            "<p id=\"lateness-warning\" class=failed role=\"alert\">{}</p>",
            escape(warning)
        );
    }
    let streams = report.streams.as_ref().and_then(|s| s.latency.as_ref());
    for (name, latency, measures) in [
        ("Reply wait", report.reply_wait.as_ref(), m.reply_wait),
        ("First user", report.first_user.as_ref(), m.first_user),
        ("Streams", streams, m.streams),
    ] {
        if let (Some(latency), Some(measures)) = (latency, measures) {
            let _ = writeln!(out, "<h2>{name}</h2><p class=note>{}</p>", escape(measures));
            latency_table(&mut out, latency);
        }
    }

    out.push_str("<h2>Over time</h2>");
    let step = report.series_step_s;
    let streams = matches!(report.mode, Mode::Bulk | Mode::List);
    let _ = writeln!(
        out,
        "<p class=note>In steps of {} s{}: {} per second (the first and last steps, which the \
         run covers in part, by the time it covers; one covered less than half is left out), \
         then p50 and p99 of the {} above, by the step in which each ended.</p>",
        step,
        if report.warmup_s > 0.0 {
            ", warm-up shaded and left out of every other figure"
        } else {
            ""
        },
        if streams {
            escape(m.series_users)
        } else {
            format!("{} OK and failed", m.calls)
        },
        if report.mode == Mode::Bulk {
            "batches"
        } else {
            "latency"
        },
    );
    out.push_str(&rate_svg(
        &report.series,
        step,
        report.warmup_s,
        streams,
        m.series_users,
        m.calls,
    ));
    out.push_str(&p99_svg(
        &report.series,
        report.warmup_s,
        |p| p.p50_ms,
        |p| p.p99_ms,
        "latency",
    ));

    if let (Some(latency), Some(measures)) = (&report.propagation, m.propagation) {
        out.push_str("<h2>Feed delivery</h2>");
        let _ = writeln!(out, "<p class=note>{}</p>", escape(measures));
        latency_table(&mut out, latency);
        out.push_str(&histogram_svg(
            &report.propagation_buckets,
            latency,
            "delivery",
        ));
        out.push_str(&p99_svg(
            &report.series,
            report.warmup_s,
            |_| None,
            |p| p.propagation_p99_ms,
            "delivery",
        ));
    }

    if report.targets.len() > 1 || report.targets.iter().any(|t| !t.outages.is_empty()) {
        out.push_str(
            "<h2>Per target</h2><table id=\"targets\"><tr><th>target</th><th>connections</th>\
             <th>answered</th><th>OK</th><th>failed</th><th>no answer</th><th>OK/s</th>\
             <th>p50</th><th>p99</th><th>outages</th></tr>",
        );
        for t in &report.targets {
            let (p50, p99) = t
                .latency
                .as_ref()
                .map(|l| (format!("{:.3} ms", l.p50_ms), format!("{:.3} ms", l.p99_ms)))
                .unwrap_or_default();
            let outages = if t.outages.is_empty() {
                "none".to_owned()
            } else {
                outages(t)
            };
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td>\
                 <td class=n>{}</td><td class=n>{}</td><td class=n>{:.1}</td>\
                 <td class=n>{p50}</td><td class=n>{p99}</td><td>{}</td></tr>",
                escape(&t.addr),
                t.connections,
                t.calls,
                t.ok_calls,
                t.failed_calls,
                t.connection_failures,
                t.ok_calls_per_s,
                escape(&outages)
            );
        }
        out.push_str("</table>\n");
    }

    if !report.error_kinds.is_empty() {
        out.push_str(
            "<h2>Errors</h2><p class=note>Why units failed (bulk: rows, by code and message) \
             and other errors. Messages that differ only in numbers are counted as one kind; \
             the first is shown.</p><table id=\"errors\"><tr><th>count</th><th>message</th></tr>",
        );
        for kind in &report.error_kinds {
            let _ = writeln!(
                out,
                "<tr><td class=n>{}</td><td>{}</td></tr>",
                kind.count,
                escape(&kind.message)
            );
        }
        if report.other_errors > 0 {
            let _ = writeln!(
                out,
                "<tr><td class=n>{}</td><td>of other kinds</td></tr>",
                report.other_errors
            );
        }
        out.push_str("</table>\n");
    }
    out.push_str("</body></html>\n");
    out
}

/// Draws into an SVG string with `draw`; a chart that cannot be drawn is
/// replaced by a sentence saying why.
fn svg(draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String>) -> String {
    let mut svg = String::new();
    let result = {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|err| err.to_string())
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(|err| err.to_string()))
    };
    match result {
        Ok(()) => format!("<div class=\"chart\">{svg}</div>\n"),
        Err(err) => format!("<p class=note>chart not drawn: {}</p>\n", escape(&err)),
    }
}

/// A latency distribution on a log scale, with its percentiles marked.
fn histogram_svg(buckets: &[Bucket], latency: &Latency, what: &str) -> String {
    if buckets.is_empty() {
        return String::new();
    }
    // The x axis is log10 of milliseconds, labelled in milliseconds: evenly
    // spaced labels, where plotters' own log axis crowds them.
    let low = buckets[0].from_ms.log10();
    let high = buckets[buckets.len() - 1].to_ms.log10();
    let top = buckets.iter().map(|b| b.count).max().unwrap_or(1) as f64 * 1.15;
    svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("{what} distribution (log scale)"),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(low..high, 0.0..top)
            .map_err(|err| err.to_string())?;
        chart
            .configure_mesh()
            .x_desc("milliseconds")
            .y_desc("count")
            .x_labels(10)
            .x_label_formatter(&|x| format_ms(10f64.powf(*x)))
            .y_label_formatter(&|n| format!("{n:.0}"))
            .draw()
            .map_err(|err| err.to_string())?;
        chart
            .draw_series(buckets.iter().map(|b| {
                Rectangle::new(
                    [(b.from_ms.log10(), 0.0), (b.to_ms.log10(), b.count as f64)],
                    OK_COLOUR.mix(0.7).filled(),
                )
            }))
            .map_err(|err| err.to_string())?;
        let marks = [
            ("p50", latency.p50_ms),
            ("p90", latency.p90_ms),
            ("p99", latency.p99_ms),
            ("p99.9", latency.p999_ms),
        ];
        for (i, (name, ms)) in marks.into_iter().enumerate() {
            let x = ms.log10().clamp(low, high);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, 0.0), (x, top)],
                    FAILED_COLOUR.stroke_width(1),
                )))
                .map_err(|err| err.to_string())?;
            // Staggered, so that close percentiles stay readable, and on the
            // left of their line in the right part of the chart.
            let y = top * (0.95 - 0.08 * i as f64);
            let label = format!("{name} {}", format_ms(ms));
            let x = if x > low + 0.75 * (high - low) {
                x - (high - low) * 0.012 * label.len() as f64
            } else {
                x + (high - low) * 0.005
            };
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    (x, y),
                    ("sans-serif", 13).into_font().color(&FAILED_COLOUR),
                )))
                .map_err(|err| err.to_string())?;
        }
        Ok(())
    })
}

/// `0.25 ms`, `3.1 ms`, `12 ms`, `1500 ms`: three significant figures at
/// most, no trailing zeros.
fn format_ms(ms: f64) -> String {
    let decimals = if ms >= 100.0 {
        0
    } else if ms >= 10.0 {
        1
    } else if ms >= 1.0 {
        2
    } else {
        3
    };
    let text = format!("{ms:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    };
    format!("{text} ms")
}

/// The shaded warm-up, behind the lines.
fn warmup_area(warmup_s: f64, top: f64) -> Option<Rectangle<(f64, f64)>> {
    (warmup_s > 0.0).then(|| Rectangle::new([(0.0, 0.0), (warmup_s, top)], WARMUP_COLOUR.filled()))
}

/// Per second, step by step: users carried by the streams (bulk, list), or
/// units OK and failed (the others).
fn rate_svg(
    series: &[Point],
    step_s: f64,
    warmup_s: f64,
    streams: bool,
    users: &str,
    calls: &str,
) -> String {
    if series.is_empty() {
        return String::new();
    }
    type Pick = fn(&Point) -> u64;
    let picks: Vec<(String, Pick, RGBColor)> = if streams {
        vec![(users.to_owned(), |p| p.users, OK_COLOUR)]
    } else {
        vec![
            (format!("OK {calls}"), |p| p.ok, OK_COLOUR),
            (format!("failed {calls}"), |p| p.failed, FAILED_COLOUR),
        ]
    };
    let lines = picks
        .into_iter()
        .map(|(name, pick, colour)| {
            let points = per_step(series, |p| p.rate(pick(p), step_s));
            (name, points, colour)
        })
        .collect();
    let chart = TimeChart {
        caption: "throughput per second".into(),
        y_desc: "per second",
        y_format: |n| format!("{n:.0}"),
        floor: 1.0,
    };
    chart.draw(end_s(series), warmup_s, lines)
}

/// p50 and p99 step by step (p50 left out when `p50` gives none).
fn p99_svg(
    series: &[Point],
    warmup_s: f64,
    p50: fn(&Point) -> Option<f64>,
    p99: fn(&Point) -> Option<f64>,
    what: &str,
) -> String {
    if series.iter().all(|p| p99(p).is_none()) {
        return String::new();
    }
    let lines = [("p50", p50, P50_COLOUR), ("p99", p99, P99_COLOUR)]
        .into_iter()
        .map(|(name, pick, colour)| (name.to_owned(), per_step(series, pick), colour))
        .collect();
    let chart = TimeChart {
        caption: format!("{what} p50 and p99 over time"),
        y_desc: "milliseconds",
        y_format: |ms| format!("{ms:.2}"),
        floor: 0.001,
    };
    chart.draw(end_s(series), warmup_s, lines)
}

/// Where the series ends, in seconds since the start of the run.
fn end_s(series: &[Point]) -> f64 {
    series.last().map_or(0.0, |p| p.t_s + p.span_s)
}

/// The points of one line: each step's value, drawn at the middle of the
/// part of it the run covered; steps without one are left out.
fn per_step(series: &[Point], value: impl Fn(&Point) -> Option<f64>) -> Vec<(f64, f64)> {
    series
        .iter()
        .filter_map(|p| value(p).map(|v| (p.t_s + p.span_s / 2.0, v)))
        .collect()
}

/// One line of a [`TimeChart`]: its name, its points, its colour.
type Line = (String, Vec<(f64, f64)>, RGBColor);

/// A chart of values per second of the run, with the warm-up shaded.
struct TimeChart {
    caption: String,
    y_desc: &'static str,
    y_format: fn(&f64) -> String,
    /// The least top of the y axis, for a run of zeros.
    floor: f64,
}

impl TimeChart {
    /// Draws `lines` (a name, its points, its colour) from 0 to `end`
    /// seconds.
    fn draw(&self, end: f64, warmup_s: f64, lines: Vec<Line>) -> String {
        let top = lines
            .iter()
            .flat_map(|(_, points, _)| points.iter().map(|&(_, y)| y))
            .fold(self.floor, f64::max)
            * 1.1;
        let end = end.max(1e-3);
        svg(|root| {
            let mut chart = ChartBuilder::on(root)
                .caption(&self.caption, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..end, 0.0..top)
                .map_err(|err| err.to_string())?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .y_desc(self.y_desc)
                .y_label_formatter(&self.y_format)
                .draw()
                .map_err(|err| err.to_string())?;
            if let Some(area) = warmup_area(warmup_s, top) {
                chart
                    .draw_series(std::iter::once(area))
                    .map_err(|err| err.to_string())?;
            }
            for (name, points, colour) in lines {
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                    .map_err(|err| err.to_string())?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|err| err.to_string())
        })
    }
}
