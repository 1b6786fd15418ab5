//! `user-load`: a load generator for `grpcUser.UserService`, one subcommand
//! per call pattern, plus `gen` (sample users for `--data`), `sink` (a
//! server that discards everything, to measure the generator alone) and
//! `merge` (one report of the runs of several generators).
//!
//! Every run is bounded (`--total` or `--duration`, 10 s by default), and
//! its exit status says whether it did its work (see `report.rs`).
//!
//! Layout, in the order a run goes through it:
//! - `cli/`: the subcommands and their flags (`mod.rs`), checked into one
//!   `Plan` (`plan.rs`); `threshold.rs` parses and checks `--fail-if`.
//! - `connect.rs`: connections to every target, TLS, metadata, and the
//!   health Check that proves each connection works.
//! - `source.rs`: the users sent: a `--data` file, or realistic users from
//!   `sample.rs`, the package's small library (`sample_users`), which the
//!   ceiling benchmark shares.
//! - `budget.rs`: what bounds a run (total, duration, Ctrl-C); `pacer.rs`
//!   the thread that starts open-loop calls when they are due.
//! - `run.rs`: a run from start to report (waiting for `--start-at`); one
//!   module per mode (`bulk.rs`, `unary.rs` for add and get, `list.rs`,
//!   `sync.rs`); `workers.rs` what the modes share: the context their
//!   workers start from and the outcomes they hand back, added up per
//!   target; `targets.rs` which targets are up, reconnecting to those
//!   that are not.
//! - `record.rs`: what workers record while the run goes; `series.rs` the
//!   run in slots of wall-clock time; `stats.rs` the totals they add up
//!   to; `progress.rs` the progress bar; `verify.rs` the check through
//!   ListUsers.
//! - `report/`: the figures, the verdict and the exit status (`mod.rs`),
//!   as text (`text.rs`); `html.rs` the `--html` page; `hdr.rs` the
//!   histograms in `--json`; `merge.rs` one report of several runs'.
//! - `generate.rs` (gen), `sink.rs` and `copy.rs`: the subcommands that
//!   are not load.

mod budget;
mod bulk;
mod cli;
mod connect;
mod copy;
mod generate;
mod hdr;
mod html;
mod list;
mod merge;
mod pacer;
mod progress;
mod record;
mod report;
mod run;
mod series;
mod sink;
mod source;
mod stats;
mod sync;
mod targets;
mod threshold;
mod unary;
mod verify;
mod workers;

use std::process::ExitCode;

use cli::{Action, Cli, OutputArgs};
use connect::SetupError;

/// The generator shares the machine with the server it measures: mimalloc
/// makes its many small allocations (messages sent and received) cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status when the command line or an input file is wrong (as clap's
/// own usage errors).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let action = match Cli::action_from(std::env::args_os()) {
        Ok(action) => action,
        Err(err) => err.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("user-load: cannot start the runtime: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match action {
        Action::Gen(args) => generate::write(&args),
        Action::Copy(args) => copy::main(&runtime, &args),
        Action::Sink(args) => {
            match runtime.block_on(sink::serve(&args.addr, args.addr_file.as_deref())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("user-load: sink: {err}");
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }
        Action::Load(plan) => {
            let output = plan.output.clone();
            match runtime.block_on(run::run(*plan)) {
                Ok(report) => print(&report, &output),
                Err(err) => {
                    eprintln!("user-load: {err}");
                    ExitCode::from(match err {
                        SetupError::Input(_) => EXIT_USAGE,
                        SetupError::Unreachable(_) => report::EXIT_FAILED,
                    })
                }
            }
        }
        Action::Merge(args) => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            match merge::merge(&args.files, command, &args.output.fail_if) {
                Ok(report) => print(&report, &args.output),
                Err(err) => {
                    eprintln!("user-load: merge: {err}");
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }
    }
}

/// Prints `report` as `output` asks, and exits as it says.
fn print(report: &report::Report, output: &OutputArgs) -> ExitCode {
    if output.json {
        match serde_json::to_string(report) {
            Ok(json) => println!("{json}"),
            Err(err) => eprintln!("user-load: {err}"),
        }
    } else {
        print!("{}", report.render());
    }
    if let Some(path) = &output.html
        && let Err(err) = html::write(report, path)
    {
        eprintln!("user-load: --html {}: {err}", path.display());
        return ExitCode::from(EXIT_USAGE);
    }
    // The reasons on stderr too, for a report sent to a file.
    if report.exit_code != 0 {
        eprintln!("user-load: {}", report.result());
    }
    ExitCode::from(report.exit_code)
}
