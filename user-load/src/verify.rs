//! `--verify`: after a run, check through ListUsers that every user the
//! server said it stored is there.

use std::{collections::HashSet, time::Duration};

use serde::Serialize;
use user_service::proto;

use crate::{
    connect::Client,
    stats::{Stats, describe},
};

/// Bounds the verifying scan: ListUsers streams well over a million users a
/// second, so this covers stores far larger than a test run makes.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(120);

/// Missing ids listed in the report.
const MAX_MISSING_SHOWN: usize = 5;

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    /// Users that should be stored, and how many of them were found.
    pub expected: u64,
    pub found: u64,
    pub detail: String,
}

impl VerifyReport {
    /// list: every scan was in strict id order.
    pub fn order(violations: u64, users: u64) -> VerifyReport {
        VerifyReport {
            ok: violations == 0,
            expected: users,
            found: users - violations.min(users),
            detail: format!("{users} listed users, {violations} out of strict id order"),
        }
    }

    /// get: every read succeeded and returned the user asked for.
    pub fn reads(stats: &Stats) -> VerifyReport {
        let ok_calls = stats.ok;
        let ok = ok_calls == stats.calls && stats.errors.is_empty();
        VerifyReport {
            ok,
            expected: stats.calls,
            found: ok_calls,
            detail: format!(
                "{ok_calls} of {} reads returned the user asked for",
                stats.calls
            ),
        }
    }
}

impl VerifyReport {
    /// The reports of several targets as one; each target's detail is
    /// named when there are several.
    pub fn combine(reports: Vec<(String, VerifyReport)>) -> VerifyReport {
        let several = reports.iter().filter(|(_, r)| r.expected > 0).count() > 1;
        let mut combined = VerifyReport {
            ok: true,
            expected: 0,
            found: 0,
            detail: String::new(),
        };
        for (addr, report) in reports {
            if several && report.expected == 0 && report.ok {
                continue;
            }
            combined.ok &= report.ok;
            combined.expected += report.expected;
            combined.found += report.found;
            if !combined.detail.is_empty() {
                combined.detail.push_str("; ");
            }
            if several {
                combined.detail.push_str(&format!("{addr}: "));
            }
            combined.detail.push_str(&report.detail);
        }
        combined
    }
}

/// Lists the store and checks that every id in `ids` is there. `prefix`,
/// when every id starts with it, limits the scan to the run's own users.
/// `unlisted` failures (rows the server reported failed without naming them)
/// may account for that many missing ids.
pub async fn stored(
    client: &mut Client,
    prefix: Option<&str>,
    ids: Vec<String>,
    unlisted: u64,
) -> VerifyReport {
    let expected = ids.len() as u64;
    let prefix = prefix.filter(|p| ids.iter().all(|id| id.starts_with(p)));
    let mut missing: HashSet<String> = ids.into_iter().collect();
    let scan = async {
        let request = proto::ListUsersRequest {
            verified: None,
            after_id: prefix.unwrap_or_default().to_owned(),
            limit: 0,
        };
        let mut stream = client.list_users(request).await?.into_inner();
        while let Some(user) = stream.message().await? {
            if prefix.is_some_and(|p| !user.id.starts_with(p)) {
                break;
            }
            missing.remove(&user.id);
        }
        Ok::<_, tonic::Status>(())
    };
    let scanned = match tokio::time::timeout(VERIFY_TIMEOUT, scan).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(status)) => Err(format!("ListUsers: {}", describe(&status))),
        Err(_) => Err("ListUsers did not finish in time".to_owned()),
    };
    if let Err(err) = scanned {
        return VerifyReport {
            ok: false,
            expected,
            found: 0,
            detail: err,
        };
    }
    let found = expected - missing.len() as u64;
    let ok = missing.len() as u64 <= unlisted;
    let mut detail = format!("{found} of {expected} users reported stored are listed");
    if unlisted > 0 {
        detail.push_str(&format!(
            " ({unlisted} failures were not itemised, so up to that many may be missing)"
        ));
    }
    if !missing.is_empty() {
        let mut shown: Vec<&String> = missing.iter().collect();
        shown.sort();
        shown.truncate(MAX_MISSING_SHOWN);
        detail.push_str(&format!("; missing include {shown:?}"));
    }
    VerifyReport {
        ok,
        expected,
        found,
        detail,
    }
}
