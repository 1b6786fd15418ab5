//! A real PostgreSQL for the tests, never a mock.
//!
//! The database is `USER_SERVICE_TEST_DATABASE_URL` (scripts/test.sh sets it
//! to a fresh database it creates and drops), or the local server on
//! 127.0.0.1:5432 (`USER_SERVICE_TEST_LOCAL_PG` names another address, as
//! for scripts/test-database.sh). Each test works in a schema of its own,
//! made empty and dropped when the test is done, so that tests running side
//! by side never see each other's users or seqs.
//!
//! A test that restarts the database, or cuts every connection to it, gets a
//! throwaway cluster of its own ([`Cluster`]): initdb into a temporary
//! directory, its own port, stopped when dropped. The machine's shared
//! server is never restarted.
//!
//! Every PostgreSQL test starts by asking whether it can run
//! ([`skip_without_database`], [`skip_without_server_programs`]). With
//! `USER_SERVICE_TEST_DATABASE_URL` set, as in scripts/test.sh and so in CI,
//! the answer is always yes: the tests are required, and one that cannot
//! reach its database fails. Without it, as under a plain `cargo test`, a
//! test that finds no local server (or no server programs) returns at once,
//! and the test binary says at exit, once, which tests did not run and why.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex, Once, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio_postgres::{Client, NoTls};

/// The test database's URL. Set, it also makes the PostgreSQL tests
/// required: none is skipped.
const DATABASE_URL_VAR: &str = "USER_SERVICE_TEST_DATABASE_URL";

/// The local server's `HOST:PORT`, when it is not on the default port.
const LOCAL_PG_VAR: &str = "USER_SERVICE_TEST_LOCAL_PG";

/// Why a test that needs a [`Cluster`] cannot have one.
const NO_SERVER_PROGRAMS: &str = "no PostgreSQL server programs (initdb, pg_ctl) under \
    /usr/lib/postgresql: install Debian's postgresql package (scripts/install-test-tools.sh \
    does) or set USER_SERVICE_PG_BIN";

/// How long the check for a local server waits for it to answer: a server
/// that is there answers in milliseconds; an address that drops packets
/// must not hold up every test.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The database the tests use, unless a test makes its own cluster.
pub fn database_url() -> String {
    std::env::var(DATABASE_URL_VAR).unwrap_or_else(|_| {
        let local = std::env::var(LOCAL_PG_VAR).unwrap_or_else(|_| "127.0.0.1:5432".into());
        format!("postgres://postgres@{local}/postgres")
    })
}

/// Whether the PostgreSQL tests must run here (and fail rather than skip).
fn required() -> bool {
    std::env::var_os(DATABASE_URL_VAR).is_some()
}

/// True when the calling test is to return at once, skipped: no database
/// was named and the local server does not answer. Never true when the
/// PostgreSQL tests are required (see the module's doc).
pub fn skip_without_database() -> bool {
    if required() {
        return false;
    }
    static LOCAL_SERVER: OnceLock<Result<(), String>> = OnceLock::new();
    match LOCAL_SERVER.get_or_init(probe_local_server) {
        Ok(()) => false,
        Err(why) => {
            skipped(why);
            true
        }
    }
}

/// True when the calling test, which starts a [`Cluster`] of its own, is to
/// return at once, skipped: the server programs are not installed. Never
/// true when the PostgreSQL tests are required (see the module's doc).
pub fn skip_without_server_programs() -> bool {
    if required() || find_server_bin_dir().is_some() {
        return false;
    }
    skipped(NO_SERVER_PROGRAMS);
    true
}

/// Connects once to the local server, on a thread of its own: the caller
/// may be inside a test's runtime, of either flavour.
fn probe_local_server() -> Result<(), String> {
    let url = database_url();
    let probe = url.clone();
    let answer = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime
            .block_on(answers(&probe))
            .map_err(|err| with_causes(&err))
    })
    .join()
    .unwrap_or_else(|_| Err("the check panicked".to_owned()));
    answer.map_err(|err| {
        format!(
            "no PostgreSQL answers at {url} ({err}); set {DATABASE_URL_VAR} to a database, or \
             run scripts/test.sh, which provides one"
        )
    })
}

/// Whether a PostgreSQL server answers a query at `url`.
async fn answers(url: &str) -> Result<(), tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(PROBE_TIMEOUT);
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.map(drop)
}

/// An error and its causes: "error connecting to server: Connection
/// refused (os error 111)".
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        text.push_str(&format!(": {err}"));
        cause = err.source();
    }
    text
}

/// The tests skipped so far, by reason.
static SKIPPED: Mutex<BTreeMap<String, BTreeSet<String>>> = Mutex::new(BTreeMap::new());

/// Notes that the running test is skipped for `why`; the list is printed
/// when the test binary exits.
fn skipped(why: &str) {
    // The test harness runs each test on a thread named after it.
    let test = std::thread::current()
        .name()
        .unwrap_or("a test on an unnamed thread")
        .to_owned();
    SKIPPED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry(why.to_owned())
        .or_default()
        .insert(test);
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a function that takes no argument and does not
        // unwind (it ignores every error), as atexit(3) requires.
        unsafe { libc::atexit(print_skipped) };
    });
}

/// Prints the skipped tests once, after the harness's own summary: a
/// skipped test is listed as passed there, and this says it did not run.
extern "C" fn print_skipped() {
    let skipped = SKIPPED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut note = String::new();
    for (why, tests) in skipped.iter() {
        note.push_str(&format!(
            "\nnote: {} PostgreSQL test(s) did not run: {why}\n",
            tests.len()
        ));
        for test in tests {
            note.push_str(&format!("    {test}\n"));
        }
    }
    // Straight to the file descriptor: the harness captures the print
    // macros, and nothing may panic here.
    let _ = std::io::stderr().write_all(note.as_bytes());
}

/// `url` with its connections' `search_path` set to `schema`.
pub fn with_schema(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-csearch_path%3D{schema}")
}

/// Connects to `url`, driving the connection on a task.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|err| panic!("cannot reach PostgreSQL at {url}: {}", with_causes(&err)));
    tokio::spawn(connection);
    client
}

/// Runs `sql` with the `psql` shell on `url`, as an operator would: its exit
/// status, stdout and stderr. Stops at the first error.
pub fn psql(url: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args(["--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1"])
        .arg("--dbname")
        .arg(url)
        .arg("--command")
        .arg(sql)
        .output()
        .expect("psql (Debian's postgresql-client; scripts/install-test-tools.sh)")
}

/// [`psql`], which must succeed.
pub fn psql_ok(url: &str, sql: &str) {
    let output = psql(url, sql);
    assert!(
        output.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An empty schema of its own in the test database, dropped (with
/// everything in it) when this is dropped.
pub struct TestSchema {
    pub name: String,
    /// The database's URL with this schema as the search path: what a store
    /// is opened on.
    pub url: String,
    base: String,
}

impl TestSchema {
    pub async fn new() -> TestSchema {
        Self::in_database(&database_url()).await
    }

    /// A new schema in the database at `base`.
    pub async fn in_database(base: &str) -> TestSchema {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let client = connect(base).await;
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .expect("create a test schema");
        TestSchema {
            url: with_schema(base, &name),
            name,
            base: base.to_owned(),
        }
    }

    /// A client whose search path is this schema.
    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // On a thread of its own: a Drop cannot await, and may run inside
        // the test's runtime.
        let (base, name) = (self.base.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let Ok((client, connection)) = tokio_postgres::connect(&base, NoTls).await else {
                    return;
                };
                tokio::spawn(connection);
                // A store still connected holds no lock while idle; one that
                // does is not waited for long.
                let _ = client
                    .batch_execute(&format!(
                        "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {name} CASCADE"
                    ))
                    .await;
            });
        });
        let _ = dropped.join();
    }
}

/// A PostgreSQL cluster of its own in a temporary directory, on its own
/// port, that a test may restart or cut off; stopped when dropped.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl Cluster {
    /// initdb and start. Needs the server programs (Debian's `postgresql`
    /// package, which scripts/install-test-tools.sh installs); as root, they
    /// run as the `postgres` user.
    pub fn start() -> Cluster {
        let bin = server_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("user-service-pg")
            .tempdir()
            .expect("a temporary directory");
        if is_root() {
            chown_postgres(dir.path());
        }
        let data = dir.path().join("data");
        run(
            as_postgres(&bin.join("initdb"))
                .arg("--pgdata")
                .arg(&data)
                .args(["--username=postgres", "--auth=trust", "--no-sync"])
                .args(["--encoding=UTF8", "--locale=C"]),
            "initdb",
        );
        let port = free_port();
        let cluster = Cluster { dir, bin, port };
        cluster.pg_ctl("start");
        cluster
    }

    /// The directory of its Unix socket (for connections without TLS once
    /// [`Cluster::require_tls`] refuses them over TCP).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl restart` (fast shutdown: open connections are ended), waiting
    /// until it accepts connections again.
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    /// Serves TLS only, with this certificate and key (PEM): TCP
    /// connections without TLS are refused. Restarts the server.
    pub fn require_tls(&self, cert_pem: &str, key_pem: &str) {
        self.serve_tls(cert_pem, key_pem, "hostssl");
    }

    /// Serves TLS with this certificate and key (PEM) to the clients that
    /// ask for it, and plain TCP to the others. Restarts the server.
    pub fn offer_tls(&self, cert_pem: &str, key_pem: &str) {
        self.serve_tls(cert_pem, key_pem, "host");
    }

    /// TLS on, and TCP connections from loopback let in by `hba_type`
    /// (`hostssl`: TLS only; `host`: either).
    fn serve_tls(&self, cert_pem: &str, key_pem: &str, hba_type: &str) {
        let data = self.dir.path().join("data");
        let write = |name: &str, text: &str| {
            let path = data.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if is_root() {
                chown_postgres(&path);
            }
        };
        write("server.crt", cert_pem);
        write("server.key", key_pem);
        write(
            "pg_hba.conf",
            &format!("local all all trust\n{hba_type} all all 127.0.0.1/32 trust\n"),
        );
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        if !text.contains("\nssl = on\n") {
            text.push_str("\nssl = on\n");
        }
        std::fs::write(&conf, text).unwrap();
        self.restart();
    }

    /// Stops the server (fast: open connections are ended).
    pub fn stop(&self) {
        self.pg_ctl("stop");
    }

    pub fn start_again(&self) {
        self.pg_ctl("start");
    }

    fn pg_ctl(&self, action: &str) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        run(
            as_postgres(&self.bin.join("pg_ctl"))
                .arg(action)
                .arg("--pgdata")
                .arg(&data)
                .arg("--log")
                .arg(&log)
                .args(["--mode=fast", "--wait", "--timeout=60"])
                .arg("-o")
                .arg(options),
            &format!("pg_ctl {action}"),
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("stop")
            .arg("--pgdata")
            .arg(&data)
            .args(["--mode=immediate", "--wait"])
            .status();
    }
}

/// Where the server programs are: `USER_SERVICE_PG_BIN`, or the newest of
/// Debian's /usr/lib/postgresql/*/bin.
fn server_bin_dir() -> PathBuf {
    find_server_bin_dir().unwrap_or_else(|| panic!("{NO_SERVER_PROGRAMS}"))
}

fn find_server_bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("USER_SERVICE_PG_BIN") {
        return Some(dir.into());
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // SAFETY: geteuid only reads the process's user id.
    unsafe { libc::geteuid() == 0 }
}

/// `program`, run as the `postgres` user when we are root (the server
/// refuses to run as root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn chown_postgres(dir: &Path) {
    run(
        Command::new("chown").arg("postgres:postgres").arg(dir),
        "chown",
    );
}

fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}
