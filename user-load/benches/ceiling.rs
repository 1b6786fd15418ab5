//! The ceiling of bulk import: the work BulkAddUsers does for each row
//! (decode, validate, insert in batches) with no network, on one thread.
//!
//! `cargo bench -p user-load --bench ceiling` imports 1,000,000 realistic
//! users and prints users/s for each stage added in turn, and the process's
//! memory with the users stored. Under `cargo test` it runs a small import,
//! so that it cannot rot.
//!
//! What it measures is the service's own code; it lives beside the load
//! generator because it imports the same users (`sample_users`).

use std::time::{Duration, Instant};

use prost::Message;
use sample_users::UserPool;
use user_service::{MemoryStore, proto, store::StoreExt, user::NewUser, validate};

/// Users imported by the full benchmark: the size the server targets are
/// stated for.
const FULL_USERS: u64 = 1_000_000;

/// Users imported under `cargo test`.
const SMOKE_USERS: u64 = 10_000;

/// The server's batch: rows that have arrived are committed together, at
/// most this many (`MAX_BATCH` in `service/bulk.rs`).
const BATCH: usize = 1024;

/// Distinct generated users, cycled (as `user-load` does).
const POOL_SIZE: usize = 65_536;

/// The server's allocator, so that the ceiling does the same work.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Decode,
    Validate,
    Insert,
}

fn main() {
    // SAFETY: first thing in `main`: no other thread exists yet.
    unsafe { user_service::allocator::tune_mimalloc() };
    let full = std::env::args().any(|arg| arg == "--bench");
    let users = if full { FULL_USERS } else { SMOKE_USERS };

    // The rows as they arrive: protobuf messages, each length-delimited.
    let pool = UserPool::new(POOL_SIZE, 1);
    let mut wire = Vec::new();
    for n in 0..users {
        pool.get(n)
            .encode_length_delimited(&mut wire)
            .expect("a Vec grows as needed");
    }
    println!(
        "ceiling: {users} users, {:.1} bytes each on the wire",
        wire.len() as f64 / users as f64
    );

    for stage in [Stage::Decode, Stage::Validate, Stage::Insert] {
        let (elapsed, store) = import(&wire, stage);
        let name = match stage {
            Stage::Decode => "decode",
            Stage::Validate => "decode + validate",
            Stage::Insert => "decode + validate + insert",
        };
        println!(
            "  {name:<28} {:>12.0} users/s  ({:.3} s)",
            users as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64()
        );
        if let Some(store) = store {
            assert_eq!(store.len() as u64, users, "every row is stored");
            // Growth during one stage would miss memory that earlier stages
            // freed and the allocator reused, so the whole process is shown.
            println!(
                "  process RSS with the users stored: {:.0} MiB (of which {:.0} MiB are the encoded rows)",
                rss_kib() as f64 / 1024.0,
                wire.len() as f64 / (1024.0 * 1024.0)
            );
        }
    }
}

/// Runs the stages up to `last` over every row and returns how long it took.
fn import(mut wire: &[u8], last: Stage) -> (Duration, Option<MemoryStore>) {
    let store = MemoryStore::new(1024);
    let mut batch = Vec::with_capacity(BATCH);
    let mut kept = 0u64;
    let start = Instant::now();
    while !wire.is_empty() {
        let row = proto::User::decode_length_delimited(&mut wire).expect("valid rows");
        let user = NewUser::from(row);
        if last >= Stage::Validate && validate::new_user(&user).is_err() {
            continue;
        }
        if last == Stage::Insert {
            batch.push(user);
            if batch.len() == BATCH {
                insert(&store, &mut batch);
            }
        } else {
            kept += std::hint::black_box(&user).first_name.len() as u64;
        }
    }
    insert(&store, &mut batch);
    let elapsed = start.elapsed();
    std::hint::black_box(kept);
    (elapsed, (last == Stage::Insert).then_some(store))
}

/// Commits a batch as the BulkAddUsers handler does.
fn insert(store: &MemoryStore, batch: &mut Vec<NewUser>) {
    if batch.is_empty() {
        return;
    }
    let results = futures::executor::block_on(
        store.create_many(std::mem::replace(batch, Vec::with_capacity(BATCH))),
    );
    assert!(results.iter().all(Result::is_ok), "generated ids are new");
}

/// This process's resident memory, in KiB (0 where /proc is missing).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
