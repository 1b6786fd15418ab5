//! The progress bar: on stderr, only when it is a terminal and the report
//! is text, with the running count of errors.

use std::{
    io::IsTerminal,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};

use crate::{budget::Budget, cli::Plan, record::Live};

/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// Shows the run's progress until the budget is spent; `None` when there
/// is no terminal to show it on.
pub fn show(plan: &Plan, unit: &str, live: Arc<Live>, budget: Arc<Budget>) -> Option<ProgressBar> {
    if plan.output.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let length = plan.run_length();
    let bar = match (plan.total, length) {
        (Some(total), _) => ProgressBar::new(total),
        (None, Some(d)) => ProgressBar::new(d.as_millis() as u64),
        (None, None) => ProgressBar::new_spinner(),
    };
    let by_time = plan.total.is_none() && length.is_some();
    let template = if by_time {
        "{spinner} [{elapsed_precise}] {wide_bar} {msg}"
    } else {
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    let (shown, unit, warmup) = (bar.clone(), unit.to_owned(), plan.warmup);
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(PROGRESS_TICK);
        while !budget.is_done() {
            tick.tick().await;
            let done = live.done.load(Ordering::Relaxed);
            let errors = live.errors.load(Ordering::Relaxed);
            let elapsed = start.elapsed();
            let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
            shown.set_position(if by_time {
                elapsed.as_millis() as u64
            } else {
                done
            });
            let phase = if elapsed < warmup { "warm-up, " } else { "" };
            shown.set_message(format!(
                "{phase}{done} {unit}, {rate:.0}/s, {errors} error{}",
                if errors == 1 { "" } else { "s" }
            ));
        }
    });
    Some(bar)
}
