//! gen: sample users as JSON Lines on stdout, in the form `--data` reads,
//! so that a file import can be tried without a file at hand:
//!
//!     user-load gen --count 100000 > users.jsonl
//!     user-load bulk --data users.jsonl --verify

use std::{
    io::{self, BufWriter, Write},
    process::ExitCode,
};

use user_service::proto;

use crate::{cli::GenArgs, source::JsonUser};

/// A name longer than validation allows (256 bytes).
const TOO_LONG: usize = 300;

/// Writes the users `args` asks for; a closed stdout (`| head`) ends the
/// output quietly.
pub fn write(args: &GenArgs) -> ExitCode {
    let stdout = io::stdout().lock();
    match write_to(args, BufWriter::new(stdout)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("user-load: gen: writing stdout: {err}");
            ExitCode::FAILURE
        }
    }
}

fn write_to(args: &GenArgs, mut out: impl Write) -> io::Result<()> {
    let mut rng = fastrand::Rng::with_seed(args.seed);
    for n in 0..args.count {
        let mut user = sample_users::user(&mut rng);
        if let Some(prefix) = &args.id_prefix {
            user.id = format!("{prefix}{n:010}");
        }
        if rng.u8(..100) < args.invalid {
            break_a_rule(&mut user, &mut rng);
        }
        serde_json::to_writer(&mut out, &JsonUser::from(user))?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Makes `user` break one of the validation rules, picked at random.
fn break_a_rule(user: &mut proto::User, rng: &mut fastrand::Rng) {
    match rng.u8(..3) {
        0 => user.first_name = " ".to_owned(),
        1 => user.last_name = "x".repeat(TOO_LONG),
        _ => user.id = format!("not valid {}", rng.u32(..)),
    }
}

#[cfg(test)]
mod tests {
    use user_service::{user::NewUser, validate};

    use super::*;

    fn generate(count: u64, invalid: u8, id_prefix: Option<&str>) -> Vec<proto::User> {
        let args = GenArgs {
            count,
            invalid,
            id_prefix: id_prefix.map(str::to_owned),
            seed: 7,
        };
        let mut out = Vec::new();
        write_to(&args, &mut out).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<JsonUser>(line).unwrap().into())
            .collect()
    }

    fn valid(user: &proto::User) -> bool {
        validate::new_user(&NewUser::from(user.clone())).is_ok()
    }

    #[test]
    fn writes_valid_users_by_default() {
        let users = generate(500, 0, Some("u-"));
        assert_eq!(users.len(), 500);
        assert!(users.iter().all(valid));
        assert_eq!(users[42].id, "u-0000000042");
        assert!(generate(3, 0, None).iter().all(|u| u.id.is_empty()));
    }

    #[test]
    fn writes_the_share_of_invalid_users_asked_for() {
        let users = generate(2000, 10, None);
        let invalid = users.iter().filter(|u| !valid(u)).count();
        assert!((140..=260).contains(&invalid), "{invalid} invalid of 2000");
    }
}
