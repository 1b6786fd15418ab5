//! The command line as the help promises it: each mode takes its own flags
//! and refuses every other, and nonsense values are refused.

use std::collections::BTreeSet;

use clap::{CommandFactory, error::ErrorKind};

use super::*;

fn parse(line: &str) -> Result<Action, clap::Error> {
    Cli::action_from(std::iter::once("user-load").chain(line.split_whitespace()))
}

fn plan(line: &str) -> Plan {
    match parse(line) {
        Ok(Action::Load(plan)) => *plan,
        Ok(_) => panic!("{line}: not a load mode"),
        Err(err) => panic!("{line}: {err}"),
    }
}

fn refused(line: &str) -> String {
    match parse(line) {
        Ok(_) => panic!("{line}: accepted"),
        Err(err) => err.to_string(),
    }
}

/// A valid value for each flag that takes one.
fn value_for(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "--start-at" => in_an_hour(),
        "--addr" => "127.0.0.1:1",
        "--connections" | "--concurrency" | "--in-flight" | "--watchers" => "2",
        "--total" | "--count" | "--per-stream" | "--prefill" | "--limit" => "5",
        "--duration" | "--timeout" | "--warmup" | "--step-every" => "1s",
        "--rps" | "--rps-end" | "--rps-step" => "10",
        "--schedule" => "step",
        "--cacert" | "--cert" | "--key" | "--auth-token-file" | "--data" | "--html"
        | "--addr-file" => "f",
        "--cname" => "localhost",
        "--header" => "x-a: b",
        "--metadata" => r#"{"x-a":"b"}"#,
        "--fail-if" => "p99>10ms",
        "--seed" | "--invalid" => "3",
        "--id-prefix" => "u",
        "--skipTLS" | "--insecure" | "--verify" | "--json" | "--help" | "--version" => {
            return None;
        }
        other => panic!("no test value for {other}"),
    })
}

/// An hour from now, as Unix seconds.
fn in_an_hour() -> &'static str {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    String::leak(format!("{}", now.as_secs() + 3600))
}

/// Which flags each mode takes: what the help promises. Every other
/// flag of the program must be refused.
const TARGET: &[&str] = &[
    "--addr",
    "--connections",
    "--cacert",
    "--skipTLS",
    "--cert",
    "--key",
    "--cname",
    "--insecure",
    "--auth-token-file",
    "--header",
    "--metadata",
    "--start-at",
];
const OUTPUT: &[&str] = &["--json", "--html", "--fail-if"];
const PACE: &[&str] = &[
    "--rps",
    "--schedule",
    "--rps-end",
    "--rps-step",
    "--step-every",
    "--warmup",
];
const MODES: &[(&str, &[&str])] = &[
    (
        "bulk",
        &[
            "--concurrency",
            "--total",
            "--duration",
            "--timeout",
            "--per-stream",
            "--data",
            "--seed",
            "--verify",
        ],
    ),
    (
        "add",
        &[
            "--concurrency",
            "--total",
            "--duration",
            "--timeout",
            "--data",
            "--seed",
            "--verify",
        ],
    ),
    (
        "get",
        &[
            "--concurrency",
            "--total",
            "--duration",
            "--timeout",
            "--prefill",
            "--seed",
            "--verify",
        ],
    ),
    (
        "list",
        &[
            "--concurrency",
            "--total",
            "--duration",
            "--timeout",
            "--limit",
            "--prefill",
            "--seed",
            "--verify",
        ],
    ),
    (
        "sync",
        &[
            "--in-flight",
            "--watchers",
            "--total",
            "--duration",
            "--timeout",
            "--data",
            "--seed",
            "--verify",
        ],
    ),
    ("gen", &["--count", "--invalid", "--id-prefix", "--seed"]),
    ("sink", &["--addr", "--addr-file"]),
    ("merge", &[]),
];

fn accepted(mode: &str) -> BTreeSet<&'static str> {
    let own = MODES.iter().find(|(m, _)| *m == mode).unwrap().1;
    let mut flags: BTreeSet<&str> = own.iter().copied().collect();
    if !["gen", "sink", "merge"].contains(&mode) {
        flags.extend(TARGET);
    }
    if !["gen", "sink"].contains(&mode) {
        flags.extend(OUTPUT);
    }
    if ["add", "get", "sync"].contains(&mode) {
        flags.extend(PACE);
    }
    flags
}

/// The flags clap knows for a subcommand, so that a flag added to the
/// program but not to the table above fails this test.
fn clap_flags(mode: &str) -> BTreeSet<String> {
    let command = Cli::command();
    let sub = command.find_subcommand(mode).unwrap();
    sub.get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .filter(|l| l != "--help")
        .collect()
}

#[test]
fn each_mode_takes_its_own_flags_and_refuses_every_other() {
    let mut every_flag: BTreeSet<&str> = BTreeSet::new();
    for (mode, _) in MODES {
        every_flag.extend(accepted(mode));
    }
    for (mode, _) in MODES {
        let ours = accepted(mode);
        let theirs: BTreeSet<String> = clap_flags(mode);
        let ours_owned: BTreeSet<String> = ours.iter().map(|f| f.to_string()).collect();
        assert_eq!(theirs, ours_owned, "{mode}: the table and the CLI differ");
        for flag in &every_flag {
            let mut line = vec!["user-load", mode];
            // gen needs its count; each flag is tried alone otherwise.
            if *mode == "gen" && *flag != "--count" {
                line.extend(["--count", "1"]);
            }
            line.push(flag);
            line.extend(value_for(flag));
            let result = Cli::try_parse_from(&line);
            if ours.contains(flag) {
                // Accepted by the parser; some need a partner flag
                // (e.g. --cert needs --key), which is not "unknown".
                if let Err(err) = &result {
                    assert_ne!(
                        err.kind(),
                        ErrorKind::UnknownArgument,
                        "{mode} should take {flag}: {err}"
                    );
                }
            } else {
                let err = result.expect_err(&format!("{mode} accepted {flag}"));
                assert_eq!(
                    err.kind(),
                    ErrorKind::UnknownArgument,
                    "{mode} {flag}: {err}"
                );
            }
        }
    }
}

#[test]
fn nonsense_values_are_refused() {
    for line in [
        "add --concurrency 0",
        "add --total 0",
        "bulk --total 0",
        "bulk --per-stream 0",
        "add --connections 0",
        "add --duration 0s",
        "add --timeout 0",
        "add --rps 0",
        "get --prefill 0",
        "list --limit 0",
        "sync --in-flight 0",
        "gen --count 0",
        "gen --count 5 --invalid 101",
        "add --addr localhost",
        "add --addr http://localhost:8080/x",
        "add --header nocolon",
        "add --header grpc-timeout:1S",
        "add -m [1]",
        "add --fail-if p99>10",
        "add --fail-if bogus>1",
        "add --rps-end 10",
        "add --rps 10 --rps-end 20",
        "add --rps 10 --schedule ramp",
        "add --rps 10 --schedule step --rps-end 20",
        "add --rps 10 --schedule ramp --rps-end 20 --total 50",
        "add --warmup 1s --total 5",
        "add --addr a:1,b:2 --connections 1",
        "add --cert c --key k",
        "add --cacert ca --skipTLS",
        "add --insecure --cacert ca",
        "add --auth-token-file t -H authorization:x",
        "bulk --data f --seed 2",
        "add --start-at 1",
        "add --start-at yesterday",
        "add --start-at 2020-01-01T00:00:00Z",
        "add --start-at 99999999999",
        "add --start-at 2099-01-01T00:00:00+02:00",
        "merge",
        "merge --json",
    ] {
        refused(line);
    }
}

#[test]
fn plans_take_defaults_and_schedules() {
    let p = plan("add");
    assert_eq!(p.concurrency, 64);
    assert_eq!(p.duration, Some(DEFAULT_DURATION));
    assert_eq!(p.connections, 1);
    assert_eq!(p.target.addr[0].as_str(), "127.0.0.1:8080");

    let p = plan("bulk --data users.jsonl");
    assert_eq!(p.duration, None, "the file bounds the run");

    let p = plan("add --addr localhost:1,[::1]:2,10.0.0.1:3 --connections 4");
    assert_eq!(p.connections, 4);
    assert_eq!(p.target.addr[0].host(), "localhost");
    assert_eq!(p.target.addr[1].host(), "::1");

    let p = plan("add --rps 100 --schedule ramp --rps-end 300 --duration 8s --warmup 2s");
    let schedule = p.schedule.unwrap();
    assert_eq!(schedule.rate_at(Duration::ZERO), 100.0);
    assert_eq!(schedule.rate_at(Duration::from_secs(5)), 200.0);
    assert_eq!(schedule.rate_at(Duration::from_secs(60)), 300.0);

    let p = plan("sync --rps 100 --schedule step --rps-end 250 --rps-step 100 --step-every 2s");
    let schedule = p.schedule.unwrap();
    assert_eq!(schedule.rate_at(Duration::from_millis(1999)), 100.0);
    assert_eq!(schedule.rate_at(Duration::from_secs(2)), 200.0);
    assert_eq!(schedule.rate_at(Duration::from_secs(4)), 250.0);

    let soon = std::time::SystemTime::now() + Duration::from_secs(60);
    let at = time::OffsetDateTime::from(soon)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let p = plan(&format!("add --start-at {at}"));
    let given = p.target.start_at.unwrap();
    let off = given.duration_since(soon).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_micros(1), "{at}: {off:?}");
    let p = plan(&format!("bulk --start-at {}", in_an_hour()));
    assert!(p.target.start_at.is_some());

    let p = plan("add -H x-a:b -m {\"x-c\":\"d\"}");
    assert_eq!(p.target.conn.headers[0].key.as_str(), "x-a");
    assert_eq!(p.target.conn.metadata[0].0[0].value, "d");
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("ten").is_err());
    assert!(parse_duration("5d").is_err());
    assert!(parse_duration("0s").is_err());
}

#[test]
fn help_and_version_name_the_load_generator() {
    let command = Cli::command();
    assert_eq!(command.get_name(), "user-load");
    let help = command.clone().render_long_help().to_string();
    assert!(help.contains("load generator"), "{help}");
    assert!(!help.contains("user service showing"), "{help}");
}
