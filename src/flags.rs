//! How the server's settings are read from the command line.
//!
//! Each setting is declared once, as a field of a config struct ([`Config`]
//! and the groups nested in it) whose `#[arg]` attribute gives its flag, its
//! environment variable and its default; the binary flattens those structs
//! into its flags, and [`defaults`] makes their `Default` from the same
//! attributes. Durations are given in whole seconds, as most servers' flags
//! take them.
//!
//! [`Config`]: crate::Config

use std::time::Duration;

use clap::{Args, Command, FromArgMatches, builder::TypedValueParser};

/// The settings of `T` as the flags leave them when none is given: each at
/// its default. No environment variable is read.
///
/// # Panics
///
/// If a default does not parse: a bug that any test building a `Config`
/// shows.
pub fn defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(Command::new("defaults")).mut_args(|arg| arg.env(None));
    let matches = command
        .try_get_matches_from(["defaults"])
        .expect("every setting has a default that parses");
    T::from_arg_matches(&matches).expect("every setting has a default that parses")
}

/// A duration in whole seconds, as a flag's default shows it.
pub fn seconds(duration: Duration) -> String {
    duration.as_secs().to_string()
}

/// A duration of `None` (never) as a flag's default shows it: 0.
pub fn seconds_or_never(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "0".into(), seconds)
}

/// Reads a number of seconds: the parser of `u64` flags (so the same
/// errors), mapped to a duration.
pub fn seconds_parser() -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64).map(Duration::from_secs)
}

/// Reads a number of seconds where 0 means never (`None`).
pub fn seconds_or_never_parser() -> impl TypedValueParser<Value = Option<Duration>> {
    clap::value_parser!(u64).map(|seconds| (seconds > 0).then(|| Duration::from_secs(seconds)))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    fn parse<P: TypedValueParser>(parser: &P, value: &str) -> Result<P::Value, clap::Error> {
        let command = Command::new("test");
        parser.parse_ref(&command, None, OsStr::new(value))
    }

    #[test]
    fn seconds_round_trip_and_zero_is_never() {
        let seconds_flag = seconds_parser();
        assert_eq!(parse(&seconds_flag, "30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse(&seconds_flag, "0").unwrap(), Duration::ZERO);
        assert!(parse(&seconds_flag, "1.5").is_err());
        assert!(parse(&seconds_flag, "-1").is_err());
        let never_flag = seconds_or_never_parser();
        assert_eq!(parse(&never_flag, "0").unwrap(), None);
        assert_eq!(
            parse(&never_flag, "900").unwrap(),
            Some(Duration::from_secs(900))
        );
        assert_eq!(seconds(Duration::from_secs(1800)), "1800");
        assert_eq!(seconds_or_never(None), "0");
        let some = Some(Duration::from_secs(5));
        assert_eq!(parse(&never_flag, &seconds_or_never(some)).unwrap(), some);
    }
}
