//! A real PostgreSQL for the tests, never a mock.
//!
//! The database is `USER_SERVICE_TEST_DATABASE_URL` (scripts/test.sh sets it
//! to a fresh database it creates and drops), or the server on
//! 127.0.0.1:5432. Each test works in a schema of its own, made empty and
//! dropped when the test is done, so that tests running side by side never
//! see each other's users or seqs.
//!
//! A test that restarts the database, or cuts every connection to it, gets a
//! throwaway cluster of its own ([`Cluster`]): initdb into a temporary
//! directory, its own port, stopped when dropped. The machine's shared
//! server is never restarted.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use tokio_postgres::{Client, NoTls};

/// The database the tests use, unless a test makes its own cluster.
pub fn database_url() -> String {
    std::env::var("USER_SERVICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
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
        .unwrap_or_else(|err| {
            panic!(
                "cannot reach the test database {url}: {err}; set \
                 USER_SERVICE_TEST_DATABASE_URL or run scripts/test.sh, which provides one"
            )
        });
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
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        );
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\n");
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
    if let Ok(dir) = std::env::var("USER_SERVICE_PG_BIN") {
        return dir.into();
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
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server programs (initdb, pg_ctl) under /usr/lib/postgresql: \
             install Debian's postgresql package (scripts/install-test-tools.sh does) or set \
             USER_SERVICE_PG_BIN"
        )
    })
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
