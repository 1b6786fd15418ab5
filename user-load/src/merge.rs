//! `user-load merge`: one report of the `--json` reports of several runs,
//! as when generators on several machines load one service together
//! (`--start-at`).
//!
//! Exact, not averaged: counts are added up, every latency comes from the
//! histograms of all the runs added up (HdrHistogram's serialized form in
//! each report), and the series are added slot by slot on the wall clock,
//! where their slots line up. The merged report is made as a run's is, so
//! it reads, prints and fails (`--fail-if`) the same way.

use std::{collections::BTreeMap, path::Path};

use hdrhistogram::Histogram;
use serde::Deserialize;

use crate::{
    cli::Mode,
    report::{Histograms, Measured, Report, TargetMeasured, TargetReport},
    series::{Point, Slots, Span},
    stats::{ErrorKind, Errors, Stats, histogram},
    targets::Outage,
    threshold::Threshold,
    verify::VerifyReport,
};

/// The parts of a `--json` report a merge reads.
#[derive(Debug, Deserialize)]
struct RunJson {
    mode: Mode,
    concurrency: usize,
    connections: usize,
    watchers: usize,
    schedule: Option<String>,
    interrupted: bool,
    start_unix_us: u64,
    warmup_s: f64,
    duration_s: f64,
    generator_cpu_s: f64,
    pacer_cpu_s: Option<f64>,
    generators: u32,
    calls: u64,
    ok_calls: u64,
    codes: BTreeMap<String, u64>,
    connection_failures: u64,
    users: u64,
    bytes: u64,
    rows_added: u64,
    rows_failed: u64,
    rows_unconfirmed: u64,
    unanswered: u64,
    streams_aborted: BTreeMap<String, u64>,
    error_kinds: Vec<ErrorKind>,
    other_errors: u64,
    failure_kinds: Vec<ErrorKind>,
    other_failures: u64,
    streams: Option<StreamsJson>,
    targets: Vec<TargetReport>,
    series_step_s: f64,
    series: Vec<Point>,
    verify: Option<VerifyReport>,
    token_file: Option<String>,
    histograms: Histograms,
}

#[derive(Debug, Deserialize)]
struct StreamsJson {
    codes: BTreeMap<String, u64>,
}

/// `h`, checked to add up with the generator's own histograms (the same
/// range and precision).
fn fit(h: Histogram<u64>) -> Result<Histogram<u64>, String> {
    let mut fitted = histogram();
    fitted
        .add(&h)
        .map_err(|err| format!("a histogram out of user-load's range: {err:?}"))?;
    Ok(fitted)
}

fn fit_some(h: Option<Histogram<u64>>) -> Result<Option<Histogram<u64>>, String> {
    h.map(fit).transpose()
}

fn errors(kinds: Vec<ErrorKind>, others: u64) -> Errors {
    let mut errors = Errors::default();
    for kind in kinds {
        errors.add(kind.message, kind.count);
    }
    errors.others += others;
    errors
}

fn micros(seconds: f64) -> u64 {
    (seconds * 1e6).round() as u64
}

impl RunJson {
    fn measured(self) -> Result<Measured, String> {
        let h = self.histograms;
        let stats = Stats {
            latency: fit(h.latency)?,
            lateness: fit_some(h.lateness)?,
            propagation: fit_some(h.propagation)?,
            reply_wait: fit_some(h.reply_wait)?,
            first_user: fit_some(h.first_user)?,
            streams: fit_some(h.streams)?,
            stream_codes: self.streams.map(|s| s.codes).unwrap_or_default(),
            codes: self.codes,
            errors: errors(self.error_kinds, self.other_errors),
            failures: errors(self.failure_kinds, self.other_failures),
            calls: self.calls,
            ok: self.ok_calls,
            no_answer: self.connection_failures,
            aborted: self.streams_aborted,
            users: self.users,
            rows_added: self.rows_added,
            rows_failed: self.rows_failed,
            rows_unconfirmed: self.rows_unconfirmed,
            unanswered: self.unanswered,
            bytes: self.bytes,
        };
        let targets = self
            .targets
            .into_iter()
            .map(|t| {
                Ok(TargetMeasured {
                    stats: Stats {
                        latency: fit_some(t.latency_histogram)?.unwrap_or_else(histogram),
                        calls: t.calls,
                        ok: t.ok_calls,
                        no_answer: t.connection_failures,
                        users: t.users,
                        aborted: t.streams_aborted,
                        ..Stats::default()
                    },
                    addr: t.addr,
                    connections: t.connections,
                    outages: t.outages,
                })
            })
            .collect::<Result<_, String>>()?;
        let mut slots = Slots::new(micros(self.series_step_s).div_ceil(1000).max(1));
        for point in &self.series {
            slots.add(point.start_unix_ms, &point.slot());
        }
        let warmup_us = micros(self.warmup_s);
        Ok(Measured {
            mode: self.mode,
            command: String::new(),
            targets,
            concurrency: self.concurrency,
            connections: self.connections,
            watchers: self.watchers,
            schedule: self.schedule,
            span: Span {
                start_unix_us: self.start_unix_us,
                warmup_us,
                end_unix_us: self.start_unix_us + warmup_us + micros(self.duration_s),
            },
            interrupted: self.interrupted,
            cpu_s: self.generator_cpu_s,
            pacer_cpu_s: self.pacer_cpu_s,
            generators: self.generators,
            stats,
            slots,
            verify: self.verify,
            token_file: self.token_file,
        })
    }
}

/// Reads the report in `path`.
fn read(path: &Path) -> Result<Measured, String> {
    let text = std::fs::read_to_string(path).map_err(|err| err.to_string())?;
    let run: RunJson = serde_json::from_str(&text)
        .map_err(|err| format!("not a user-load --json report ({err})"))?;
    run.measured()
}

/// One report of the runs reported in `files`; `command` is the merge's
/// own command line.
pub fn merge(
    files: &[impl AsRef<Path>],
    command: String,
    fail_if: &[Threshold],
) -> Result<Report, String> {
    let mut runs = Vec::new();
    for path in files {
        let path = path.as_ref();
        runs.push((
            path,
            read(path).map_err(|err| format!("{}: {err}", path.display()))?,
        ));
    }
    let Some(((first_path, first), rest)) = runs.split_first() else {
        return Err("no report to merge".to_owned());
    };
    for (path, run) in rest {
        if run.mode != first.mode {
            return Err(format!(
                "{} is a {} run and {} a {} run: only runs of one mode merge",
                first_path.display(),
                first.mode.name(),
                path.display(),
                run.mode.name()
            ));
        }
    }
    let start = runs
        .iter()
        .map(|(_, r)| r.span.start_unix_us)
        .min()
        .unwrap_or(0);
    let end = runs
        .iter()
        .map(|(_, r)| r.span.end_unix_us)
        .max()
        .unwrap_or(start);
    // Measuring starts with the first run to measure.
    let warmup_end = runs
        .iter()
        .map(|(_, r)| r.span.start_unix_us + r.span.warmup_us)
        .min()
        .unwrap_or(start);
    let step = runs.iter().map(|(_, r)| r.slots.step_ms).max().unwrap_or(1);
    let mut merged = Measured {
        mode: first.mode,
        command,
        targets: Vec::new(),
        concurrency: 0,
        connections: 0,
        watchers: 0,
        schedule: schedules(runs.iter().map(|(_, r)| r.schedule.as_deref())),
        span: Span {
            start_unix_us: start,
            warmup_us: warmup_end - start,
            end_unix_us: end,
        },
        interrupted: false,
        cpu_s: 0.0,
        pacer_cpu_s: None,
        generators: 0,
        stats: Stats::default(),
        slots: Slots::new(step),
        verify: None,
        token_file: None,
    };
    let mut verify = Vec::new();
    for (_, run) in runs {
        merged.concurrency += run.concurrency;
        merged.connections += run.connections;
        merged.watchers += run.watchers;
        merged.interrupted |= run.interrupted;
        merged.cpu_s += run.cpu_s;
        if let Some(pacer) = run.pacer_cpu_s {
            *merged.pacer_cpu_s.get_or_insert(0.0) += pacer;
        }
        merged.generators += run.generators;
        merged.stats.merge(run.stats);
        for (slot_ms, slot) in &run.slots.regroup(step).map {
            merged.slots.add(*slot_ms, slot);
        }
        verify.extend(run.verify);
        merged.token_file = merged.token_file.or(run.token_file);
        // Outages move to the merged run's clock.
        let shift = (run.span.start_unix_us - start) as f64 / 1e6;
        for target in run.targets {
            let outages = target.outages.into_iter().map(|o| Outage {
                down_at_s: o.down_at_s + shift,
                up_at_s: o.up_at_s.map(|up| up + shift),
                cause: o.cause,
            });
            match merged.targets.iter_mut().find(|t| t.addr == target.addr) {
                Some(same) => {
                    same.connections += target.connections;
                    same.stats.merge(target.stats);
                    same.outages.extend(outages);
                }
                None => merged.targets.push(TargetMeasured {
                    outages: outages.collect(),
                    ..target
                }),
            }
        }
    }
    if !verify.is_empty() {
        merged.verify = Some(VerifyReport::combine(verify));
    }
    Ok(Report::new(merged, fail_if))
}

/// The schedules of the runs: `N × 500/s` when they share one.
fn schedules<'a>(all: impl Iterator<Item = Option<&'a str>>) -> Option<String> {
    let all: Vec<Option<&str>> = all.collect();
    let some: Vec<&str> = all.iter().flatten().copied().collect();
    if some.is_empty() {
        return None;
    }
    if some.len() == all.len() && some.iter().all(|s| *s == some[0]) {
        return Some(format!("{} × {}", some.len(), some[0]));
    }
    Some(
        all.iter()
            .map(|s| s.unwrap_or("closed loop"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}
