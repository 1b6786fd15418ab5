//! Throughput of the SQLite store, against SQLite alone and the memory store.
//!
//! ```sh
//! cargo bench --bench sqlite                              # everything
//! cargo bench --bench sqlite -- --parts bulk,unary --users 300000
//! ```
//!
//! Measures, each on a fresh database file in a temporary directory:
//! 1. straight into SQLite (rusqlite alone, the store's schema and settings,
//!    10,000-row transactions), with time-ordered and with random ids;
//! 2. BulkAddUsers over gRPC on 4 streams, server-assigned ids, then
//!    client-supplied random ids;
//! 3. unary AddUser from 64 concurrent workers, memory store vs SQLite with
//!    `--sync full` and `--sync normal`.
//!
//! Server and clients run in this one process, on loopback. Prints figures;
//! asserts nothing beyond every write succeeding. Under `cargo test` (which
//! does not pass `--bench`) it runs every part on a few thousand users, so
//! that it cannot rot.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use rusqlite::params;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use user_service::{
    Config, MemoryStore, SqliteStore, Store,
    proto::{self, user_service_client::UserServiceClient},
    store::sqlite::{Durability, SqliteOptions, open_writer},
};

#[derive(Debug, Parser)]
struct Args {
    /// Passed by `cargo bench`: the full-size run.
    #[arg(long, hide = true)]
    bench: bool,
    /// Users per bulk import.
    #[arg(long, default_value_t = 1_000_000)]
    users: u64,
    /// Concurrent BulkAddUsers streams.
    #[arg(long, default_value_t = 4)]
    streams: u64,
    /// Concurrent AddUser workers.
    #[arg(long, default_value_t = 64)]
    workers: u64,
    /// Seconds each unary run lasts.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Users per import with random ids (much slower, see BENCHMARKS.md).
    #[arg(long, default_value_t = 200_000)]
    random_users: u64,
    /// Which measurements to run.
    #[arg(long, value_delimiter = ',', default_value = "bulk,random,unary")]
    parts: Vec<Part>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Bulk,
    Random,
    Unary,
}

/// Rows per transaction when writing straight into SQLite.
const DIRECT_TXN_ROWS: u64 = 10_000;

/// The change feed is not read here; its size does not matter.
const FEED_CAPACITY: usize = 1024;

impl Args {
    /// What `cargo test` runs: every part, small.
    fn smoke() -> Args {
        Args {
            bench: false,
            users: 4_000,
            streams: 4,
            workers: 8,
            seconds: 0.2,
            random_users: 1_000,
            parts: vec![Part::Bulk, Part::Random, Part::Unary],
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo test` runs this too, with its own arguments (or none).
    let full = std::env::args().any(|arg| arg == "--bench");
    let args = if full { Args::parse() } else { Args::smoke() };
    let n = args.users;
    println!("users per import: {n}");

    if args.parts.contains(&Part::Bulk) {
        let direct_seq = direct(n, Ids::TimeOrdered).await?;
        report("SQLite alone, UUIDv7 ids", n, direct_seq);
        let grpc_seq = bulk_grpc(&args, n, Ids::Server).await?;
        report("BulkAddUsers gRPC -> SQLite, server ids", n, grpc_seq);
        println!(
            "  gRPC import reaches {:.0}% of SQLite alone",
            100.0 * direct_seq.as_secs_f64() / grpc_seq.as_secs_f64()
        );
        let memory = bulk_memory(&args).await?;
        report("BulkAddUsers gRPC -> memory, server ids", n, memory);
    }
    if args.parts.contains(&Part::Random) {
        let n = args.random_users;
        let direct_random = direct(n, Ids::Random).await?;
        report("SQLite alone, random ids", n, direct_random);
        let grpc_random = bulk_grpc(&args, n, Ids::Random).await?;
        report(
            "BulkAddUsers gRPC -> SQLite, random client ids",
            n,
            grpc_random,
        );
        println!(
            "  gRPC import reaches {:.0}% of SQLite alone",
            100.0 * direct_random.as_secs_f64() / grpc_random.as_secs_f64()
        );
    }
    if !args.parts.contains(&Part::Unary) {
        return Ok(());
    }

    println!(
        "AddUser, {} workers, {} s each:",
        args.workers, args.seconds
    );
    let mem_rate = unary(&args, MemoryStore::new(FEED_CAPACITY)).await?;
    println!("  memory store:         {mem_rate:>9.0} calls/s");
    for durability in [Durability::Full, Durability::Normal] {
        let dir = tempfile::tempdir()?;
        let store = sqlite(&dir, durability)?;
        let rate = unary(&args, store).await?;
        println!(
            "  SQLite --sync {:<6}  {rate:>9.0} calls/s ({:.0}% of memory)",
            match durability {
                Durability::Full => "full",
                Durability::Normal => "normal",
            },
            100.0 * rate / mem_rate
        );
    }
    Ok(())
}

fn report(what: &str, n: u64, took: Duration) {
    println!(
        "{what:<48} {:>9.0} users/s ({:.2} s)",
        n as f64 / took.as_secs_f64(),
        took.as_secs_f64()
    );
}

#[derive(Debug, Clone, Copy)]
enum Ids {
    /// UUIDv7 made by the benchmark (straight into SQLite).
    TimeOrdered,
    /// Left empty: the server assigns UUIDv7s.
    Server,
    /// 32 random hex digits, as a client with random keys would send.
    Random,
}

/// A reproducible stream of random ids.
struct RandomIds(fastrand::Rng);

impl RandomIds {
    fn new(seed: u64) -> Self {
        RandomIds(fastrand::Rng::with_seed(seed))
    }

    fn next(&mut self) -> String {
        format!("{:016x}{:016x}", self.0.u64(..), self.0.u64(..))
    }
}

fn bench_user(i: u64, id: String) -> proto::User {
    proto::User {
        first_name: format!("User {i}"),
        last_name: "Bench".into(),
        address: "1 Long Street, Springfield".into(),
        verified: i.is_multiple_of(2),
        id,
        version: 0,
    }
}

fn sqlite(
    dir: &tempfile::TempDir,
    durability: Durability,
) -> Result<SqliteStore, Box<dyn std::error::Error>> {
    let options = SqliteOptions {
        durability,
        feed_capacity: FEED_CAPACITY,
    };
    Ok(SqliteStore::open(dir.path().join("users.db"), options)?)
}

/// Inserts `n` users with rusqlite alone into a file with the store's schema,
/// on a connection opened as the store opens its writer's (the same
/// PRAGMAs, `--sync full`).
async fn direct(n: u64, ids: Ids) -> Result<Duration, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    sqlite(&dir, Durability::Full)?.close().await; // creates the schema
    let mut conn = open_writer(&dir.path().join("users.db"), Durability::Full)?;
    let mut random = RandomIds::new(1);
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO users (id, first_name, last_name, address, verified, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1)",
            )?;
            for _ in 0..DIRECT_TXN_ROWS.min(n - i) {
                let id = match ids {
                    Ids::Random => random.next(),
                    _ => uuid::Uuid::now_v7().hyphenated().to_string(),
                };
                let u = bench_user(i, id);
                insert.execute(params![
                    u.id,
                    u.first_name,
                    u.last_name,
                    u.address,
                    u.verified
                ])?;
                i += 1;
            }
        }
        tx.execute("UPDATE change_seq SET seq = ?1", [i as i64])?;
        tx.commit()?;
    }
    Ok(start.elapsed())
}

/// Starts a server over `store` on a loopback port; returns its URL.
async fn serve<S: Store>(store: S) -> Result<String, Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(user_service::run(
        listener,
        store,
        Config::default(),
        std::future::pending(),
    ));
    Ok(url)
}

async fn client(url: &str) -> Result<UserServiceClient<Channel>, Box<dyn std::error::Error>> {
    Ok(UserServiceClient::new(
        Channel::from_shared(url.to_owned())?.connect().await?,
    ))
}

async fn bulk_grpc(args: &Args, n: u64, ids: Ids) -> Result<Duration, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = sqlite(&dir, Durability::Full)?;
    let url = serve(store.clone()).await?;
    let took = bulk(args, n, &url, ids).await?;
    // Closed first, as a server that stops: a file is one store's at a time.
    store.close().await;
    // Opening a full file: inspection (including `PRAGMA quick_check`) and
    // schema check, as at every server start.
    let start = Instant::now();
    let reopened = sqlite(&dir, Durability::Full)?;
    println!(
        "  (opening the {n}-user file takes {:.2} s)",
        start.elapsed().as_secs_f64()
    );
    reopened.close().await;
    Ok(took)
}

async fn bulk_memory(args: &Args) -> Result<Duration, Box<dyn std::error::Error>> {
    let url = serve(MemoryStore::new(FEED_CAPACITY)).await?;
    bulk(args, args.users, &url, Ids::Server).await
}

/// Imports `n` users over `args.streams` concurrent streams, each on its own
/// connection.
async fn bulk(
    args: &Args,
    n: u64,
    url: &str,
    ids: Ids,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let per_stream = n / args.streams;
    let mut clients = Vec::new();
    for _ in 0..args.streams {
        clients.push(client(url).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (s, mut client) in clients.into_iter().enumerate() {
        let mut random = RandomIds::new(s as u64 + 100);
        let rows = (0..per_stream).map(move |i| {
            let id = match ids {
                Ids::Random => random.next(),
                _ => String::new(),
            };
            bench_user(i, id)
        });
        tasks.push(tokio::spawn(async move {
            client.bulk_add_users(tokio_stream::iter(rows)).await
        }));
    }
    for task in tasks {
        let report = task.await??.into_inner();
        assert_eq!(report.added, per_stream, "{:?}", report.errors.first());
    }
    Ok(start.elapsed())
}

/// AddUser calls per second from `args.workers` concurrent workers.
async fn unary<S: Store>(args: &Args, store: S) -> Result<f64, Box<dyn std::error::Error>> {
    /// Workers per HTTP/2 connection.
    const WORKERS_PER_CONNECTION: u64 = 16;
    let url = serve(store).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut conn = None;
    for w in 0..args.workers {
        if w.is_multiple_of(WORKERS_PER_CONNECTION) {
            conn = Some(client(&url).await?);
        }
        let mut client = conn.clone().expect("made above");
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                client
                    .add_user(bench_user(w * 1_000_000_000 + i, String::new()))
                    .await
                    .expect("add_user");
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let start = Instant::now();
    let before = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let calls = done.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    let took = start.elapsed();
    for task in tasks {
        task.await?;
    }
    Ok(calls as f64 / took.as_secs_f64())
}
