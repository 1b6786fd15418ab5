//! `--verify`: after a run, check through ListUsers that every user the
//! server said it stored is there.
//!
//! Each target is asked for the users written through it. A target that
//! is down by then is replaced by a live one that shares its store
//! (replicas on one database all do): one that lists any of the users
//! written through the dead one. When none does (separate memory servers),
//! those users are reported as not checked, never as missing.

use std::{collections::HashSet, time::Duration};

use serde::{Deserialize, Serialize};
use user_service::proto;

use crate::{
    connect::Client,
    stats::{Stats, describe, is_transport_failure},
    workers::Stored,
};

/// Bounds the verifying scan: ListUsers streams well over a million users a
/// second, so this covers stores far larger than a test run makes.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(120);

/// Missing ids listed in the report.
const MAX_MISSING_SHOWN: usize = 5;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Every user checked was found, and every user could be checked.
    pub ok: bool,
    /// Users that should be stored, how many were found, how many were
    /// not, and how many could not be checked.
    pub expected: u64,
    pub found: u64,
    #[serde(default)]
    pub missing: u64,
    #[serde(default)]
    pub unchecked: u64,
    pub detail: String,
}

impl VerifyReport {
    /// list: every scan was in strict id order.
    pub fn order(violations: u64, users: u64) -> VerifyReport {
        VerifyReport {
            ok: violations == 0,
            expected: users,
            found: users - violations.min(users),
            missing: violations.min(users),
            unchecked: 0,
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
            missing: stats.calls - ok_calls,
            unchecked: 0,
            detail: format!(
                "{ok_calls} of {} reads returned the user asked for",
                stats.calls
            ),
        }
    }

    /// The reports of several runs (or targets) as one.
    pub fn combine(reports: Vec<VerifyReport>) -> VerifyReport {
        let mut combined = VerifyReport {
            ok: true,
            ..VerifyReport::default()
        };
        for report in reports {
            combined.ok &= report.ok;
            combined.expected += report.expected;
            combined.found += report.found;
            combined.missing += report.missing;
            combined.unchecked += report.unchecked;
            if !combined.detail.is_empty() {
                combined.detail.push_str("; ");
            }
            combined.detail.push_str(&report.detail);
        }
        combined
    }

    /// `ok`, `FAILED` (users missing, or a scan failed) or `incomplete`
    /// (none missing, some not checked).
    pub fn outcome(&self) -> &'static str {
        if self.ok {
            "ok"
        } else if self.missing == 0
            && self.unchecked > 0
            && self.found + self.unchecked == self.expected
        {
            "incomplete"
        } else {
            "FAILED"
        }
    }
}

/// A target as `--verify` sees it: its address, a client, and what was
/// reported stored through it.
pub struct Written {
    pub addr: String,
    pub client: Client,
    pub stored: Vec<Stored>,
}

/// The ids a target lists, or why it could not list them (`true`: its
/// connection failed, so it is down).
type Listing = Result<HashSet<String>, (bool, String)>;

/// Checks that what `written` reports stored is listed, each target
/// through itself or, when it is down, through a live target sharing its
/// store. `prefix`, when every id starts with it, limits the scans to the
/// run's own users.
pub async fn stored(written: Vec<Written>, prefix: Option<&str>) -> VerifyReport {
    let prefix = prefix.filter(|p| {
        written
            .iter()
            .flat_map(|w| &w.stored)
            .all(|s| s.ids.iter().all(|id| id.starts_with(p)))
    });
    let mut listings: Vec<Option<Listing>> = written.iter().map(|_| None).collect();
    let several = written.iter().filter(|w| !w.stored.is_empty()).count() > 1;
    let mut reports = Vec::new();
    for target in 0..written.len() {
        let stored = &written[target].stored;
        if stored.iter().all(|s| s.added == 0) {
            continue;
        }
        let addr = &written[target].addr;
        let name = |detail: String| {
            if several {
                format!("{addr}: {detail}")
            } else {
                detail
            }
        };
        list(&written, &mut listings, target, prefix).await;
        let mut through = None;
        if let Some(Err((true, _))) = &listings[target] {
            // Down: a live target that lists any of its users shares its
            // store.
            for other in (0..written.len()).filter(|&o| o != target) {
                list(&written, &mut listings, other, prefix).await;
                if let Some(Ok(listed)) = &listings[other]
                    && stored
                        .iter()
                        .flat_map(|s| &s.ids)
                        .any(|id| listed.contains(id))
                {
                    through = Some(other);
                    break;
                }
            }
        }
        let expected: u64 = stored.iter().map(|s| s.added).sum();
        let report = match (&listings[through.unwrap_or(target)], through) {
            (Some(Ok(listed)), _) => {
                let mut report = check(stored, listed);
                if let Some(other) = through {
                    report.detail.push_str(&format!(
                        ", checked through {} ({addr} is down)",
                        written[other].addr
                    ));
                }
                report.detail = name(report.detail);
                report
            }
            (Some(Err((true, cause))), None) => {
                let mut shown: Vec<&String> = stored.iter().flat_map(|s| &s.ids).collect();
                shown.sort();
                shown.truncate(MAX_MISSING_SHOWN);
                VerifyReport {
                    ok: false,
                    expected,
                    unchecked: expected,
                    detail: name(format!(
                        "{expected} users could not be checked, e.g. {shown:?}: the target is \
                         down ({cause}) and no live target lists any of them (it has a store \
                         of its own)"
                    )),
                    ..VerifyReport::default()
                }
            }
            (Some(Err((_, cause))), _) => VerifyReport {
                ok: false,
                expected,
                detail: name(format!("ListUsers failed: {cause}")),
                ..VerifyReport::default()
            },
            (None, _) => unreachable!("listed above"),
        };
        reports.push(report);
    }
    if reports.is_empty() {
        return VerifyReport {
            ok: true,
            detail: "no user was reported stored".to_owned(),
            ..VerifyReport::default()
        };
    }
    VerifyReport::combine(reports)
}

/// Lists `target` into `listings`, once.
async fn list(
    written: &[Written],
    listings: &mut [Option<Listing>],
    target: usize,
    prefix: Option<&str>,
) {
    if listings[target].is_none() {
        let mut client = written[target].client.clone();
        listings[target] = Some(list_ids(&mut client, prefix).await);
    }
}

/// Every id `client` lists (from `prefix` on, while they start with it).
async fn list_ids(client: &mut Client, prefix: Option<&str>) -> Listing {
    let mut ids = HashSet::new();
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
            ids.insert(user.id);
        }
        Ok::<_, tonic::Status>(())
    };
    match tokio::time::timeout(VERIFY_TIMEOUT, scan).await {
        Ok(Ok(())) => Ok(ids),
        Ok(Err(status)) => Err((is_transport_failure(&status), describe(&status))),
        Err(_) => Err((false, "ListUsers did not finish in time".to_owned())),
    }
}

/// How many of the users in `stored` are in `listed`. Of a stream whose
/// reply did not list every failure, `added` of its ids should be found.
fn check(stored: &[Stored], listed: &HashSet<String>) -> VerifyReport {
    let (mut expected, mut found) = (0, 0);
    let mut shown = Vec::new();
    for group in stored {
        let present = group.ids.iter().filter(|id| listed.contains(*id)).count() as u64;
        expected += group.added;
        found += present.min(group.added);
        if group.ids.len() as u64 == group.added && present < group.added {
            shown.extend(
                group
                    .ids
                    .iter()
                    .filter(|id| !listed.contains(*id))
                    .take(MAX_MISSING_SHOWN)
                    .cloned(),
            );
        }
    }
    let missing = expected - found;
    let mut detail = if missing == 0 {
        format!("all {expected} users reported stored are listed")
    } else {
        format!("{found} of {expected} users reported stored are listed, {missing} missing")
    };
    if !shown.is_empty() {
        shown.sort();
        shown.truncate(MAX_MISSING_SHOWN);
        detail.push_str(&format!(", e.g. {shown:?}"));
    }
    VerifyReport {
        ok: missing == 0,
        expected,
        found,
        missing,
        unchecked: 0,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_verdict_and_the_numbers_agree() {
        let listed: HashSet<String> = ids(&["a", "b", "c", "x"]).into_iter().collect();
        let report = check(&[Stored::each(ids(&["a", "b", "c"]))], &listed);
        assert!(report.ok, "{report:?}");
        assert_eq!(report.detail, "all 3 users reported stored are listed");

        // One missing: the report fails and says which.
        let report = check(&[Stored::each(ids(&["a", "b", "d"]))], &listed);
        assert!(!report.ok);
        assert_eq!((report.found, report.missing), (2, 1));
        assert!(
            report.detail.contains("1 missing, e.g. [\"d\"]"),
            "{report:?}"
        );

        // A stream whose reply did not name every failure: two of its
        // three rows were added, and two are found.
        let partly = Stored {
            ids: ids(&["a", "b", "y"]),
            added: 2,
        };
        let report = check(&[partly], &listed);
        assert!(report.ok, "{report:?}");
        assert_eq!((report.expected, report.found, report.missing), (2, 2, 0));
        // One added, none found.
        let partly = Stored {
            ids: ids(&["y", "z"]),
            added: 1,
        };
        let report = check(&[partly], &listed);
        assert_eq!((report.ok, report.missing), (false, 1));
        assert_eq!(report.outcome(), "FAILED");
    }
}
