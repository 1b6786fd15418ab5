//! The command line: one subcommand per load mode, each with only the flags
//! that mean something for it, and the checks clap cannot express.
//!
//! Every mode is turned into one [`Plan`] that the rest of the program reads,
//! so the modes never look at flags that are not theirs.

use std::{
    path::PathBuf,
    str::FromStr,
    time::{Duration, SystemTime},
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::{
    codegen::http::uri::Authority,
    metadata::{Ascii, MetadataKey, MetadataValue},
};

use crate::threshold::Threshold;

/// Default run length when neither `--total` nor `--duration` nor `--data`
/// bounds it: long enough for stable figures, short enough to never run away.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// The address the server listens on by default (its own `--addr` default).
const DEFAULT_ADDR: &str = "127.0.0.1:8080";

/// A load generator for grpcUser.UserService, one subcommand per call
/// pattern.
///
/// Every run is bounded (`--total` or `--duration`, 10 s by default) and
/// prints a report; `--json` and `--html PATH` write it for machines and for
/// people. Each mode counts a unit of work: a call (add, get), a scan
/// (list), a row (bulk), an upsert (sync). The exit status says whether the
/// run did its work: 0 it did; 1 it could not (no call reached the server,
/// units failed and no --fail-if errors condition says how many may, units
/// got no answer, a stream was aborted, or --verify found a problem); 2 the
/// command line or an input file is wrong; 99 a --fail-if condition held;
/// 130 interrupted by Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "user-load", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// BulkAddUsers: client streams importing users, as fast as the server
    /// takes them.
    Bulk(BulkArgs),
    /// AddUser: unary calls storing new users, closed loop or at a rate.
    Add(AddArgs),
    /// GetUser: unary reads of users imported first, closed loop or at a
    /// rate.
    Get(GetArgs),
    /// ListUsers: full (or limited) scans of the store.
    List(ListArgs),
    /// SyncUsers: upserts on one stream with requests in flight, while
    /// watcher streams time the delivery of each Change.
    Sync(SyncArgs),
    /// Write sample users as JSON Lines on stdout, for `--data`.
    Gen(GenArgs),
    /// Serve a UserService that decodes every request and stores nothing,
    /// to measure the generator alone.
    Sink(SinkArgs),
    /// Combine the --json reports of runs on several machines into one
    /// report: counts added up, percentiles of the histograms added up,
    /// series lined up on the wall clock.
    Merge(MergeArgs),
    /// Copy every user of one server into another, ids kept (SQLite to
    /// PostgreSQL, say), and report what was read, added and refused.
    Copy(crate::copy::CopyArgs),
}

/// Where (and when) the load goes, and how to connect.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Server address(es), HOST:PORT, comma-separated. Connections are
    /// spread over them round-robin and the report gives each one's figures.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = DEFAULT_ADDR,
          value_delimiter = ',', value_parser = parse_host_port, value_name = "HOST:PORT,...")]
    pub addr: Vec<HostPort>,

    /// HTTP/2 connections, spread round-robin over the targets (default: one
    /// per target). Workers are spread round-robin over the connections.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: Option<u32>,

    #[command(flatten)]
    pub conn: ConnectArgs,

    /// Start the load at this time rather than at once (after connecting
    /// and any --prefill): RFC 3339 (2030-06-01T12:00:00Z) or Unix seconds.
    /// Generators on several machines given the same time start together;
    /// `user-load merge` then makes one report of their --json reports.
    #[arg(long, value_name = "TIME", value_parser = parse_start_at)]
    pub start_at: Option<SystemTime>,
}

/// How to connect to a server: TLS, the token and metadata sent with
/// every call.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Speak TLS, checking the server's certificate against this CA
    /// certificate (PEM). Without --cacert or --skipTLS user-load speaks
    /// plaintext.
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Speak TLS without checking the server's certificate or name: for test
    /// certificates only (ghz's flag of the same name).
    #[arg(long = "skipTLS")]
    pub skip_tls: bool,

    /// Client certificate (PEM) for a server that requires one (mutual TLS).
    /// Needs --key, and --cacert or --skipTLS.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// The client certificate's private key (PEM). Needs --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// The name the server's certificate must carry (default: the host of
    /// each address).
    #[arg(long, value_name = "NAME")]
    pub cname: Option<String>,

    /// Plaintext, no TLS: the default, a flag for users of ghz (where it
    /// must be asked for).
    #[arg(long, conflicts_with_all = ["cacert", "skip_tls", "cert", "key", "cname"])]
    pub insecure: bool,

    /// Send `authorization: Bearer <token>` with every call, the token read
    /// from FILE (surrounding whitespace trimmed), for a server started with
    /// --auth-token-file.
    #[arg(long, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Metadata sent with every call, as grpcurl's `-H 'name: value'`.
    /// Repeatable.
    #[arg(short = 'H', long = "header", value_name = "'NAME: VALUE'", value_parser = parse_header)]
    pub headers: Vec<Header>,

    /// Metadata sent with every call, as ghz's `-m '{"name": "value"}'`.
    #[arg(short = 'm', long = "metadata", value_name = "JSON", value_parser = parse_metadata)]
    pub metadata: Vec<Metadata>,
}

impl ConnectArgs {
    /// The checks that involve several of these flags.
    pub fn check(&self) -> Result<(), String> {
        let tls = self.cacert.is_some() || self.skip_tls;
        if !tls && self.cert.is_some() {
            return Err(
                "--cert is for TLS: give the server's CA with --cacert, or --skipTLS".to_owned(),
            );
        }
        if !tls && self.cname.is_some() {
            return Err(
                "--cname is for TLS: give the server's CA with --cacert, or --skipTLS".to_owned(),
            );
        }
        if self.cacert.is_some() && self.skip_tls {
            return Err(
                "--cacert checks the server's certificate and --skipTLS does not: give one"
                    .to_owned(),
            );
        }
        let authorization = self
            .headers
            .iter()
            .chain(self.metadata.iter().flat_map(|m| &m.0))
            .any(|h| h.key.as_str() == "authorization");
        if authorization && self.auth_token_file.is_some() {
            return Err("both --auth-token-file and an authorization header: give one".to_owned());
        }
        Ok(())
    }
}

/// What the report is written as, and when the run counts as failed.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// Also write the report as one self-contained HTML page with charts.
    #[arg(long, value_name = "PATH")]
    pub html: Option<PathBuf>,

    /// Fail the run (exit status 99) when this condition holds over the
    /// measured figures. Repeatable. Forms: `errors>1%` or `errors>0`
    /// (failed units, a share or a count: calls, scans, rows for bulk,
    /// upserts for sync; with one, failed units no longer fail the run by
    /// themselves); `p99>10ms` (also p50, p90, p95, p99.9, max, mean; units
    /// us, ms, s) for the report's first latency; `rate<5000` for its
    /// throughput per second (OK calls, OK Acks, rows added or users
    /// listed). Operators: > >= < <=.
    #[arg(long = "fail-if", value_name = "CONDITION", value_parser = Threshold::parse)]
    pub fail_if: Vec<Threshold>,
}

/// Open-loop pacing, for the modes where each call is timed.
#[derive(Debug, Clone, Args)]
pub struct PaceArgs {
    /// Open loop: start this many calls per second whatever the latency
    /// (the first rate of a schedule). Latency counts from when each call
    /// was due, so a slow server cannot hide its queueing. Without it each
    /// worker starts its next call when the last one returns.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rps: Option<u32>,

    /// How --rps changes: `const`; `ramp`, linearly to --rps-end over the
    /// whole run; `step`, by --rps-step every --step-every up to --rps-end.
    #[arg(long, value_enum, requires = "rps")]
    pub schedule: Option<ScheduleKind>,

    /// ramp, step: the last rate, in calls per second.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), requires = "schedule")]
    pub rps_end: Option<u32>,

    /// step: calls per second added at each step.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), requires = "schedule")]
    pub rps_step: Option<u32>,

    /// step: how long each step lasts.
    #[arg(long, value_parser = parse_duration, requires = "schedule", value_name = "DURATION")]
    pub step_every: Option<Duration>,

    /// Run this long first without measuring: warm-up calls count in
    /// neither the totals nor the thresholds, only in the per-second series.
    #[arg(long, value_parser = parse_duration, conflicts_with = "total", value_name = "DURATION")]
    pub warmup: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleKind {
    Const,
    Ramp,
    Step,
}

#[derive(Debug, Clone, Args)]
pub struct BulkArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// BulkAddUsers streams open at once.
    #[arg(short = 'c', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Stop after sending this many users.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub total: Option<u64>,
    /// Stop sending after this long (e.g. 10s, 500ms, 2m).
    #[arg(short = 'z', long, value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,
    /// How long a stream's reply may take once it can send no more.
    #[arg(short = 't', long, default_value = "20s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Close each stream after this many users and open another.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub per_stream: Option<u64>,
    #[command(flatten)]
    pub users: UsersArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Where the users sent come from, for the modes that write.
#[derive(Debug, Clone, Args)]
pub struct UsersArgs {
    /// Users to send, as JSON Lines (`{"first_name": ..., "last_name": ...,
    /// "address": ..., "verified": ..., "id": ...}`, as `user-load gen`
    /// writes them), streamed from disk. Default: generated users.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Seed of the generated users.
    #[arg(long, default_value_t = 1, conflicts_with = "data")]
    pub seed: u64,
    /// Check afterwards, through ListUsers, that every user reported stored
    /// is there. Users without an id then get one chosen by the generator.
    #[arg(long)]
    pub verify: bool,
}

/// How many unary calls, for how long, each with what deadline (add, get).
#[derive(Debug, Clone, Args)]
pub struct CallArgs {
    /// Workers, each with one call in flight.
    #[arg(short = 'c', long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Stop after this many calls.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub total: Option<u64>,
    /// Stop starting calls after this long (after --warmup).
    #[arg(short = 'z', long, value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,
    /// Deadline of each call.
    #[arg(short = 't', long, default_value = "20s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub calls: CallArgs,
    #[command(flatten)]
    pub pace: PaceArgs,
    #[command(flatten)]
    pub users: UsersArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub calls: CallArgs,
    #[command(flatten)]
    pub pace: PaceArgs,
    /// Users imported first (not measured); the reads pick among them.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub prefill: u64,
    /// Seed of the imported users.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Check that every read returned the user asked for.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Scanners, each starting its next scan when the last one ends.
    #[arg(short = 'c', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Stop after this many scans.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub total: Option<u64>,
    /// Start no scan after this long (the ones under way finish).
    #[arg(short = 'z', long, value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,
    /// Deadline of each scan.
    #[arg(short = 't', long, default_value = "20s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// At most this many users per scan (default: the whole store).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
    /// Users imported first (not measured).
    #[arg(long, default_value_t = 0)]
    pub prefill: u64,
    /// Seed of the imported users.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Check that every scan is in strict id order.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Upserts sent on the one SyncUsers stream and not yet acknowledged,
    /// at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub in_flight: u32,
    /// Other SyncUsers streams that only receive the Changes and time their
    /// delivery.
    #[arg(long, default_value_t = 8)]
    pub watchers: u32,
    /// Stop after this many upserts.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub total: Option<u64>,
    /// Stop sending after this long (after --warmup).
    #[arg(short = 'z', long, value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,
    /// How long the Acks (and the watchers' Changes) still owed may take
    /// once sending has stopped.
    #[arg(short = 't', long, default_value = "20s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    #[command(flatten)]
    pub pace: PaceArgs,
    #[command(flatten)]
    pub users: UsersArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct GenArgs {
    /// How many users to write.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Percentage of users that break a validation rule (an empty first
    /// name, a name too long, an id with a space), to try error handling.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100), value_name = "PERCENT")]
    pub invalid: u8,
    /// Give every user an id, PREFIX followed by its line number (without
    /// it the server assigns ids).
    #[arg(long, value_name = "PREFIX", value_parser = parse_id_prefix)]
    pub id_prefix: Option<String>,
    /// Seed: the same seed writes the same users.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = DEFAULT_ADDR, value_parser = parse_host_port, value_name = "HOST:PORT")]
    pub addr: HostPort,
    /// Once listening, write the address bound (`IP:PORT` and a newline)
    /// to this file, atomically, as the server's own flag does.
    #[arg(long, value_name = "PATH")]
    pub addr_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The --json reports to merge, of runs of one mode.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A `host:port` as given: a name is resolved when connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort(Authority);

impl HostPort {
    /// `host:port`, as given (IPv6 hosts in brackets).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The host without brackets: what a certificate names.
    pub fn host(&self) -> &str {
        self.0.host().trim_start_matches('[').trim_end_matches(']')
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) fn parse_host_port(text: &str) -> Result<HostPort, String> {
    let text = text.trim();
    let authority = Authority::from_str(text)
        .map_err(|_| format!("{text:?} is not HOST:PORT (e.g. localhost:8080, 10.0.0.5:8080)"))?;
    if text.contains('@') || authority.host().is_empty() {
        return Err(format!("{text:?} is not HOST:PORT"));
    }
    if authority.port_u16().is_none() {
        return Err(format!("{text:?} has no port (e.g. {text}:8080)"));
    }
    Ok(HostPort(authority))
}

/// A metadata entry sent with every call.
#[derive(Debug, Clone)]
pub struct Header {
    pub key: MetadataKey<Ascii>,
    pub value: MetadataValue<Ascii>,
}

/// The entries of one `-m` JSON object.
#[derive(Debug, Clone)]
pub struct Metadata(pub Vec<Header>);

fn header(name: &str, value: &str) -> Result<Header, String> {
    let name = name.trim().to_ascii_lowercase();
    if name.ends_with("-bin") {
        return Err(format!("{name:?}: binary (-bin) metadata is not supported"));
    }
    // Set by gRPC itself: sending them again would break the call.
    if name.starts_with("grpc-") || ["content-type", "te", ":authority"].contains(&name.as_str()) {
        return Err(format!("{name:?} is set by gRPC itself"));
    }
    let key = MetadataKey::from_str(&name)
        .map_err(|_| format!("{name:?} is not a valid metadata name"))?;
    let value = MetadataValue::try_from(value.trim())
        .map_err(|_| format!("the value of {name:?} must be printable ASCII"))?;
    Ok(Header { key, value })
}

fn parse_header(text: &str) -> Result<Header, String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not 'NAME: VALUE'"))?;
    header(name, value)
}

fn parse_metadata(text: &str) -> Result<Metadata, String> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|err| format!("not a JSON object of strings ({err})"))?;
    object
        .iter()
        .map(|(name, value)| match value {
            serde_json::Value::String(value) => header(name, value),
            _ => Err(format!("the value of {name:?} must be a string")),
        })
        .collect::<Result<_, _>>()
        .map(Metadata)
}

fn parse_id_prefix(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 48
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(text.to_owned())
    } else {
        Err("1 to 48 characters of A-Z, a-z, 0-9, _ and - (ids are at most 64)".into())
    }
}

/// How far ahead `--start-at` may be: further is more likely a mistake
/// (a Unix time in milliseconds) than a plan.
const MAX_START_AHEAD: Duration = Duration::from_secs(24 * 3600);

/// `--start-at`: RFC 3339, or Unix seconds (a fraction allowed), within
/// the next day.
fn parse_start_at(text: &str) -> Result<SystemTime, String> {
    let text = text.trim();
    let at = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let seconds: f64 = text
            .parse()
            .map_err(|_| format!("{text:?} is not a Unix time"))?;
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(seconds)
    } else {
        let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map_err(|err| {
                format!(
                    "{text:?} is neither RFC 3339 (2030-06-01T12:00:00Z) nor a Unix time: {err}"
                )
            })?;
        SystemTime::from(at)
    };
    let now = SystemTime::now();
    match at.duration_since(now) {
        Err(_) => Err(format!("{text:?} is in the past")),
        Ok(ahead) if ahead > MAX_START_AHEAD => Err(format!(
            "{text:?} is more than a day ahead (a Unix time is in seconds)"
        )),
        Ok(_) => Ok(at),
    }
}

/// A positive duration: `10s`, `500ms`, `2m`, `1h`, `250us`; a bare number
/// is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
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
        _ => return Err(format!("unknown unit {unit:?} (use us, ms, s, m or h)")),
    };
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        Ok(_) => Err("must be more than zero".into()),
        Err(err) => Err(err.to_string()),
    }
}

mod plan;

pub use plan::{Action, Mode, Plan, Schedule};

#[cfg(test)]
mod tests;
