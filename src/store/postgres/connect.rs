//! Reaching the database: the connection settings (a libpq-style URL and the
//! `PG*` environment variables), TLS (as `sslmode` says, see `tls`), the
//! read pool, what counts as a lost connection, and the backoff between
//! reconnection attempts.

use std::{fmt, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use futures::future::BoxFuture;
use tokio_postgres::{Client, Config, NoTls, Socket, error::SqlState};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{self, SslMode, Tls};
use crate::store::StoreError;

/// How long one connection attempt may take (the TCP connect, TLS and the
/// startup exchange), unless the URL or `PGCONNECT_TIMEOUT` says otherwise:
/// a database that does not answer makes calls fail within it, not hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections for reads (GetUser, listing pages), besides the writer's and
/// the tailer's own. A couple of cores serve no more reads at once; the
/// bound keeps a burst of calls from opening connections without limit.
pub const MAX_READERS: usize = 8;

/// How long a read waits for a free pooled connection before it fails with
/// UNAVAILABLE.
pub const POOL_WAIT: Duration = Duration::from_secs(5);

/// How long one statement (a read, a commit, a changelog read) may take
/// before the connection is taken for lost: a database that stopped
/// answering without closing the connection (a network partition) would
/// otherwise hold calls until TCP gives up, which takes minutes.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The first wait before reconnecting after a failed attempt, doubled at
/// each failure up to [`MAX_BACKOFF`], with jitter so that replicas do not
/// reconnect in step.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between two reconnection attempts: how long, at most, a
/// replica stays unavailable after its database is back.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The `application_name` the server's connections report
/// (`pg_stat_activity`), unless the URL or `PGAPPNAME` names another.
pub const APPLICATION_NAME: &str = "user-service";

/// Why the connection settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid PostgreSQL URL: {0}")]
    Url(tokio_postgres::Error),
    #[error("invalid {name}: {value:?}")]
    Env { name: &'static str, value: String },
    #[error(
        "invalid sslmode {0:?}: libpq's are disable, allow, prefer, require, verify-ca and \
         verify-full"
    )]
    SslMode(String),
    #[error("cannot read the CA certificates in {path} (sslrootcert): {detail}")]
    RootCert { path: String, detail: String },
    #[error("no CA certificates in the system's store to verify the database server with: {0}")]
    NoRoots(String),
    #[error(
        "sslmode={0} checks the database's certificate against a root certificate, and \
         there is none (no sslrootcert, PGSSLROOTCERT or ~/.postgresql/root.crt): add \
         sslrootcert=PATH, a PEM file of the CA that signed it, or \
         sslmode=verify-full&sslrootcert=system for the system's CAs"
    )]
    NoRootCert(&'static str),
    #[error(
        "sslrootcert=system needs sslmode=verify-full (the system's CAs vouch for any host \
         they issued a certificate to, so only the host name check makes them mean \
         something), as for libpq; sslmode={0} given"
    )]
    SystemRoots(&'static str),
    #[error("{target}: {detail}: create it (createdb), or name another database in --store")]
    NoDatabase { target: String, detail: String },
}

/// How to reach the database: the settings of every connection the store
/// opens, and its TLS.
#[derive(Clone)]
pub struct Connector {
    config: Config,
    tls: Tls,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        write!(f, "Connector({self})")
    }
}

impl fmt::Display for Connector {
    /// `user@host:port/dbname`, and whether TLS is on; never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let hosts: Vec<String> = c
            .get_hosts()
            .iter()
            .map(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let port = c.get_ports().first().copied().unwrap_or(5432);
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            c.get_user().unwrap_or(""),
            hosts.join(","),
            port,
            c.get_dbname().unwrap_or(c.get_user().unwrap_or(""))
        )?;
        if self.tls.mode.requires_tls() {
            write!(f, " (TLS, sslmode={})", self.tls.mode.name())?;
        }
        Ok(())
    }
}

impl Connector {
    /// Settings from a libpq-style URL (`postgres://USER:PASSWORD@HOST:PORT/DB
    /// ?sslmode=require&options=...`), with what it leaves out taken from the
    /// `PG*` environment variables as libpq would (`PGHOST`, `PGPORT`,
    /// `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `PGAPPNAME`,
    /// `PGCONNECT_TIMEOUT`, `PGOPTIONS`).
    ///
    /// TLS: libpq's `sslmode` (`prefer` by default) and `sslrootcert`, from
    /// the URL or `PGSSLMODE` and `PGSSLROOTCERT`, with libpq's meanings but
    /// for one stricter place (see `tls`).
    pub fn from_url(url: &str) -> Result<Connector, ConfigError> {
        Self::from_url_and_env(url, |name| std::env::var(name).ok())
    }

    /// [`Connector::from_url`] with the environment given as a function.
    pub fn from_url_and_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Connector, ConfigError> {
        let (url, tls) = tls::from_url(url, &env)?;
        let mut config: Config = url.parse().map_err(ConfigError::Url)?;
        if config.get_hosts().is_empty() {
            match env("PGHOST") {
                Some(host) => {
                    config.host(&host);
                }
                None => {
                    config.host("localhost");
                }
            }
        }
        if config.get_ports().is_empty()
            && let Some(port) = env("PGPORT")
        {
            let parsed = port.parse().map_err(|_| ConfigError::Env {
                name: "PGPORT",
                value: port.clone(),
            })?;
            config.port(parsed);
        }
        if config.get_user().is_none()
            && let Some(user) = env("PGUSER")
        {
            config.user(user);
        }
        if config.get_password().is_none()
            && let Some(password) = env("PGPASSWORD")
        {
            config.password(password);
        }
        if config.get_dbname().is_none()
            && let Some(dbname) = env("PGDATABASE")
        {
            config.dbname(dbname);
        }
        if config.get_options().is_none()
            && let Some(options) = env("PGOPTIONS")
        {
            config.options(options);
        }
        // Every statement of the store is short: PostgreSQL's JIT compiler,
        // which the planner's guesses can set off (about the one-row counter
        // table, or a listing page of a large table), took 30 ms to compile
        // a statement that runs in well under one.
        let options = format!("{} -c jit=off", config.get_options().unwrap_or_default());
        config.options(options.trim_start());
        if config.get_application_name().is_none() {
            config.application_name(env("PGAPPNAME").unwrap_or_else(|| APPLICATION_NAME.into()));
        }
        if config.get_connect_timeout().is_none() {
            let timeout = match env("PGCONNECT_TIMEOUT") {
                Some(secs) => Duration::from_secs(secs.parse().map_err(|_| ConfigError::Env {
                    name: "PGCONNECT_TIMEOUT",
                    value: secs.clone(),
                })?),
                None => CONNECT_TIMEOUT,
            };
            config.connect_timeout(timeout);
        }
        config.ssl_mode(match tls.mode {
            // `allow` tries a plain connection first (see `connect_raw`).
            SslMode::Disable | SslMode::Allow => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        Ok(Connector { config, tls })
    }

    /// Opens a connection and spawns the task that drives it; the client
    /// fails with a closed error once the connection is gone.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, driver) = self.connect_raw().await?;
        tokio::spawn(driver.run());
        Ok(client)
    }

    /// Opens a connection, leaving its driving to the caller (the tailer,
    /// which reads notifications from it).
    pub async fn connect_raw(&self) -> Result<(Client, Driver), tokio_postgres::Error> {
        let Some(tls) = &self.tls.connector else {
            return connect_plain(&self.config).await;
        };
        if self.tls.mode != SslMode::Allow {
            return connect_tls(&self.config, tls).await;
        }
        // `allow`, as libpq: plain first, and TLS if the server refused
        // that (an error from the server, such as pg_hba.conf's "no
        // encryption"); a server out of reach is out of reach either way.
        match connect_plain(&self.config).await {
            Err(err) if err.as_db_error().is_some() => {
                let mut config = self.config.clone();
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                connect_tls(&config, tls).await
            }
            plain => plain,
        }
    }

    /// A pool of at most [`MAX_READERS`] connections for reads, opened as
    /// they are needed.
    pub fn pool(&self) -> Pool {
        let manager_config = ManagerConfig {
            // A connection whose driver has seen it close is dropped, not
            // handed out; one closed since is caught by the read's retry.
            recycling_method: RecyclingMethod::Fast,
        };
        // Connected as every other connection is, `allow` included.
        let manager = Manager::from_connect(self.config.clone(), self.clone(), manager_config);
        Pool::builder(manager)
            .max_size(MAX_READERS)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(
                self.config
                    .get_connect_timeout()
                    .copied()
                    .unwrap_or(CONNECT_TIMEOUT),
            ))
            .recycle_timeout(Some(STATEMENT_TIMEOUT))
            .build()
            .expect("a runtime and a size are set")
    }
}

impl deadpool_postgres::Connect for Connector {
    fn connect(
        &self,
        _config: &Config,
    ) -> BoxFuture<'_, Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>> {
        Box::pin(async move {
            let (client, driver) = self.connect_raw().await?;
            Ok((client, tokio::spawn(driver.run())))
        })
    }
}

async fn connect_plain(config: &Config) -> Result<(Client, Driver), tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    Ok((client, Driver::Plain(Box::new(connection))))
}

async fn connect_tls(
    config: &Config,
    tls: &MakeRustlsConnect,
) -> Result<(Client, Driver), tokio_postgres::Error> {
    let (client, connection) = config.connect(tls.clone()).await?;
    Ok((client, Driver::Tls(Box::new(connection))))
}

/// The connection half of a client: polled for the client's queries to
/// make progress, and for notifications.
pub enum Driver {
    // Boxed: a connection's state is a few hundred bytes (more with TLS),
    // and a driver is made once a connection.
    Plain(Box<tokio_postgres::Connection<Socket, tokio_postgres::tls::NoTlsStream>>),
    Tls(
        Box<
            tokio_postgres::Connection<
                Socket,
                <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<Socket>>::Stream,
            >,
        >,
    ),
}

impl Driver {
    /// Drives the connection until it ends; notifications are dropped.
    pub async fn run(self) {
        let ended = match self {
            Driver::Plain(connection) => (*connection).await,
            Driver::Tls(connection) => (*connection).await,
        };
        if let Err(err) = ended {
            tracing::debug!(error = %Report(&err), "PostgreSQL connection ended");
        }
    }

    /// Polls for the next message from the server that is not a reply (a
    /// notification or a notice); `None` once the connection has ended.
    pub fn poll_message(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<tokio_postgres::AsyncMessage, tokio_postgres::Error>>> {
        match self {
            Driver::Plain(connection) => connection.poll_message(cx),
            Driver::Tls(connection) => connection.poll_message(cx),
        }
    }
}

/// A PostgreSQL error in full, for logs and error texts: the server's
/// severity, code and message (tokio-postgres's own `Display` says only
/// "db error"), or the client's error and its cause.
pub struct Report<'a>(pub &'a tokio_postgres::Error);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_db_error() {
            Some(db) => {
                write!(
                    f,
                    "{} {}: {}",
                    db.severity(),
                    db.code().code(),
                    db.message()
                )?;
                if let Some(detail) = db.detail() {
                    write!(f, " ({detail})")?;
                }
                Ok(())
            }
            None => {
                write!(f, "{}", self.0)?;
                match std::error::Error::source(self.0) {
                    Some(source) => write!(f, ": {source}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Whether `err` means the connection is gone (closed, reset, the server
/// shutting down or terminating it) rather than a statement that failed on
/// a working connection.
pub fn is_connection_loss(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        Some(code) => {
            code.code().starts_with("08")
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::TOO_MANY_CONNECTIONS,
                    SqlState::READ_ONLY_SQL_TRANSACTION,
                ]
                .contains(code)
        }
        // No error from the server: the socket failed (I/O), the connection
        // could not be made, or it timed out.
        None => {
            std::error::Error::source(err).is_some_and(|source| source.is::<std::io::Error>())
                || err.to_string().contains("timeout")
                || err.to_string().contains("connecting")
        }
    }
}

/// What a failed statement means for the callers: a lost connection is
/// [`StoreError::Unavailable`], a full disk [`StoreError::Full`], anything
/// else internal. `what` says what failed, for the log text.
pub fn store_error(what: &str, err: &tokio_postgres::Error) -> StoreError {
    let text = format!("{what}: {}", Report(err));
    if is_connection_loss(err) {
        StoreError::Unavailable(text)
    } else if err.code() == Some(&SqlState::DISK_FULL) {
        StoreError::Full(text)
    } else {
        StoreError::Internal(text)
    }
}

/// [`store_error`] for a pool that could not hand out a connection.
pub fn pool_error(err: PoolError) -> StoreError {
    match err {
        // Whatever stops a connection from being made (refused, the server
        // starting or shutting down, connections not allowed) means the
        // database is out of reach for now.
        PoolError::Backend(err) => {
            StoreError::Unavailable(format!("PostgreSQL connection: {}", Report(&err)))
        }
        PoolError::Closed => StoreError::Internal("the store is closed".into()),
        PoolError::Timeout(kind) => {
            StoreError::Unavailable(format!("no PostgreSQL connection in time ({kind:?})"))
        }
        other => StoreError::Unavailable(format!("PostgreSQL connection: {other}")),
    }
}

/// The waits between reconnection attempts: doubling from [`MIN_BACKOFF`] to
/// [`MAX_BACKOFF`], each with up to a quarter of random jitter.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The wait before the next attempt, after one more failure.
    pub fn next_wait(&mut self) -> Duration {
        let wait = MIN_BACKOFF
            .saturating_mul(1 << self.failures.min(16))
            .min(MAX_BACKOFF);
        self.failures = self.failures.saturating_add(1);
        wait.mul_f64(0.75 + fastrand::f64() / 4.0)
    }

    /// After a success: the next failure waits [`MIN_BACKOFF`] again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_url_wins_and_the_environment_fills_in() {
        let vars = [
            ("PGHOST", "db.internal"),
            ("PGPORT", "6432"),
            ("PGUSER", "svc"),
            ("PGDATABASE", "users"),
            ("PGAPPNAME", "replica-a"),
        ];
        let c = Connector::from_url_and_env("postgres://", env(&vars)).unwrap();
        assert_eq!(c.tls.mode, SslMode::Prefer);
        assert_eq!(c.to_string(), "postgres://svc@db.internal:6432/users");
        let c = Connector::from_url_and_env("postgres:///other", env(&vars)).unwrap();
        assert_eq!(c.to_string(), "postgres://svc@db.internal:6432/other");
        assert_eq!(c.config.get_application_name(), Some("replica-a"));
        assert_eq!(c.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        let c = Connector::from_url_and_env(
            "postgres://ann:secret@127.0.0.1:5433/test?connect_timeout=2",
            env(&vars),
        )
        .unwrap();
        assert_eq!(c.to_string(), "postgres://ann@127.0.0.1:5433/test");
        assert!(!format!("{c:?}").contains("secret"));
        assert_eq!(
            c.config.get_connect_timeout(),
            Some(&Duration::from_secs(2))
        );
        let c = Connector::from_url_and_env("postgres://a@h/d", env(&[])).unwrap();
        assert_eq!(c.config.get_application_name(), Some(APPLICATION_NAME));
        assert_eq!(c.config.get_options(), Some("-c jit=off"));
        let c =
            Connector::from_url_and_env("postgres://a@h/d?options=-csearch_path%3Dusers", env(&[]))
                .unwrap();
        assert_eq!(
            c.config.get_options(),
            Some("-csearch_path=users -c jit=off")
        );
    }

    #[test]
    fn sslmode_sets_what_tokio_postgres_does_and_the_name_says_so() {
        use tokio_postgres::config::SslMode as Wire;
        let home = [("HOME", "/nonexistent")];
        let wire = |url: &str| {
            let c = Connector::from_url_and_env(url, env(&home)).unwrap();
            (c.config.get_ssl_mode(), c.to_string())
        };
        assert_eq!(
            wire("postgres://a@h/d"),
            (Wire::Prefer, "postgres://a@h:5432/d".into())
        );
        assert_eq!(wire("postgres://a@h/d?sslmode=disable").0, Wire::Disable);
        assert_eq!(wire("postgres://a@h/d?sslmode=allow").0, Wire::Disable);
        assert_eq!(
            wire("postgres://a@h/d?sslmode=require"),
            (
                Wire::Require,
                "postgres://a@h:5432/d (TLS, sslmode=require)".into()
            )
        );
        assert!(matches!(
            Connector::from_url_and_env("postgres://a@h/d?nonsense=1", env(&[])),
            Err(ConfigError::Url(_))
        ));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let first = backoff.next_wait();
        assert!(first >= MIN_BACKOFF.mul_f64(0.75) && first <= MIN_BACKOFF);
        let waits: Vec<Duration> = (0..20).map(|_| backoff.next_wait()).collect();
        assert!(waits.iter().all(|w| *w <= MAX_BACKOFF));
        assert!(*waits.last().unwrap() >= MAX_BACKOFF.mul_f64(0.75));
        backoff.reset();
        assert!(backoff.next_wait() <= MIN_BACKOFF);
    }
}
