//! `user-load`: a load generator for `grpcUser.UserService`, one mode per
//! call pattern.
//!
//! - `bulk`: S concurrent BulkAddUsers streams (`--concurrency`).
//! - `add`, `get`: unary calls, closed loop with C workers, or open loop at a
//!   fixed `--rps`.
//! - `list`: full ListUsers scans.
//! - `sync`: upserts on one SyncUsers stream with an in-flight window, while
//!   `--watchers` other streams measure how long each Change takes to reach
//!   them.
//! - `sink`: serves a UserService that decodes every request and discards it,
//!   to show how fast the generator itself can go.
//!
//! Every run is bounded: it stops at `--total` or `--duration` (10 s when
//! neither is given), and on Ctrl-C it stops sending and reports what it has.
//!
//! Layout: `run.rs` holds what all modes share (connections, the budget of
//! calls, the user source), one module per mode, `stats.rs` the counters and
//! the report, `verify.rs` the check through ListUsers, `sink.rs` the
//! discarding server.

mod bulk;
mod list;
mod run;
mod sink;
mod stats;
mod sync;
mod unary;
mod verify;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, ValueEnum};

/// The generator shares the machine with the server it measures: mimalloc
/// makes its many small allocations (messages sent and received) cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Default run length when neither `--total` nor `--duration` nor `--data`
/// bounds it: long enough for stable figures, short enough to never run away.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// A load generator for grpcUser.UserService.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// What to run.
    #[arg(value_enum)]
    pub mode: Mode,

    /// Server address (host:port, loopback by default). For `sink`, the
    /// address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Concurrent workers: BulkAddUsers streams (bulk), callers (add, get),
    /// scanners (list), or the in-flight window of the SyncUsers stream
    /// (sync). Default: bulk 4, add/get 64, list 1, sync 64.
    #[arg(long, short = 'c')]
    pub concurrency: Option<usize>,

    /// HTTP/2 connections shared by the workers.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,

    /// Stop after this many units: users (bulk), calls (add, get), scans
    /// (list), upserts (sync).
    #[arg(long, short = 'n')]
    pub total: Option<u64>,

    /// Stop after this long (e.g. 10s, 500ms, 2m).
    #[arg(long, short = 'z', value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Open loop: start this many calls per second, whatever the latency
    /// (add, get). Latency is measured from when each call was due.
    #[arg(long)]
    pub rps: Option<u64>,

    /// Users to send, as JSON Lines (`{"first_name": ..., "last_name": ...,
    /// "address": ..., "verified": ..., "id": ...}`), streamed from disk.
    /// Default: generated realistic users.
    #[arg(long)]
    pub data: Option<PathBuf>,

    /// Deadline of each unary call, each ListUsers scan and each wait for a
    /// stream's reply.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// bulk: close each stream after this many users and open another.
    #[arg(long)]
    pub per_stream: Option<u64>,

    /// get, list: import this many users first (not measured). Default: get
    /// 10000, list 0.
    #[arg(long)]
    pub prefill: Option<u64>,

    /// list: at most this many users per scan (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: u32,

    /// sync: SyncUsers streams that only watch the Changes.
    #[arg(long, default_value_t = 8)]
    pub watchers: usize,

    /// Check afterwards, through ListUsers, that every user reported added
    /// is stored (list: that scans are in strict id order). Write modes then
    /// send client-chosen ids.
    #[arg(long)]
    pub verify: bool,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,

    /// Seed of the generated users.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Connect with TLS, checking the server's certificate against this CA
    /// certificate (PEM). Without it the generator speaks plaintext.
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Client certificate (PEM), for a server that requires one (mutual
    /// TLS). Needs --key and --cacert.
    #[arg(long, value_name = "FILE", requires_all = ["key", "cacert"])]
    pub cert: Option<PathBuf>,

    /// The client certificate's private key (PEM). Needs --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// The name the server's certificate must carry (default: the host of
    /// --addr). Needs --cacert.
    #[arg(long, requires = "cacert")]
    pub cname: Option<String>,

    /// Plaintext, no TLS. This is the default; the flag is there for users
    /// of ghz, where it must be asked for.
    #[arg(long, conflicts_with = "cacert")]
    pub insecure: bool,

    /// Send `authorization: Bearer <token>` with every call, the token read
    /// from FILE (surrounding whitespace trimmed), for a server started with
    /// --auth-token-file.
    #[arg(long, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Bulk,
    Add,
    Get,
    List,
    Sync,
    Sink,
}

impl Args {
    pub fn concurrency(&self) -> usize {
        let default = match self.mode {
            Mode::Bulk => 4,
            Mode::Add | Mode::Get | Mode::Sync => 64,
            Mode::List | Mode::Sink => 1,
        };
        self.concurrency.unwrap_or(default).max(1)
    }

    /// The run length: as given, or the default when nothing else bounds it.
    pub fn duration(&self) -> Option<Duration> {
        match (self.duration, self.total, &self.data) {
            (None, None, None) => Some(DEFAULT_DURATION),
            (duration, _, _) => duration,
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (try 10s, 500ms, 2m)"))?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1e3,
        "us" => number / 1e6,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|err| err.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("user-load: cannot start the runtime: {err}");
            return ExitCode::from(2);
        }
    };
    if args.mode == Mode::Sink {
        return match runtime.block_on(sink::serve(args.addr)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("user-load: sink: {err}");
                ExitCode::from(2)
            }
        };
    }
    match runtime.block_on(run::run(&args)) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(json) => println!("{json}"),
                    Err(err) => eprintln!("user-load: {err}"),
                }
            } else {
                print!("{}", report.render());
            }
            match &report.verify {
                Some(verify) if !verify.ok => ExitCode::FAILURE,
                _ => ExitCode::SUCCESS,
            }
        }
        Err(err) => {
            // The causes too: a failed TLS handshake is only "transport
            // error" on its own.
            let mut message = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !message.contains(&cause_text) {
                    message.push_str(": ");
                    message.push_str(&cause_text);
                }
                source = cause.source();
            }
            eprintln!("user-load: {message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
