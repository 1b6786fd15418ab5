//! Reaching the database: the connection settings (a libpq-style URL and the
//! `PG*` environment variables), TLS, the read pool, what counts as a lost
//! connection, and the backoff between reconnection attempts.

use std::{fmt, sync::Arc, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::{Client, Config, NoTls, Socket, config::SslMode, error::SqlState};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;

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
    #[error("cannot read the CA certificates in {path}: {detail}")]
    RootCert { path: String, detail: String },
    #[error("no CA certificates to verify the database server with (sslmode=require): {0}")]
    NoRoots(String),
}

/// How to reach the database: the settings of every connection the store
/// opens, and its TLS.
#[derive(Clone)]
pub struct Connector {
    config: Config,
    tls: Option<MakeRustlsConnect>,
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
            "postgres://{}@{}:{}/{}{}",
            c.get_user().unwrap_or(""),
            hosts.join(","),
            port,
            c.get_dbname().unwrap_or(c.get_user().unwrap_or("")),
            if self.tls.is_some() { " (TLS)" } else { "" }
        )
    }
}

impl Connector {
    /// Settings from a libpq-style URL (`postgres://USER:PASSWORD@HOST:PORT/DB
    /// ?sslmode=require&options=...`), with what it leaves out taken from the
    /// `PG*` environment variables as libpq would (`PGHOST`, `PGPORT`,
    /// `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `PGAPPNAME`,
    /// `PGCONNECT_TIMEOUT`, `PGOPTIONS`).
    ///
    /// TLS: `sslmode=require` connects over TLS only and verifies the
    /// server's certificate, against the system's CA certificates and those
    /// in `PGSSLROOTCERT` if set (stricter than libpq's `require`, which
    /// does not verify). Without it connections are plain: a `prefer` that
    /// would silently accept any certificate protects nothing.
    pub fn from_url(url: &str) -> Result<Connector, ConfigError> {
        Self::from_url_and_env(url, |name| std::env::var(name).ok())
    }

    /// [`Connector::from_url`] with the environment given as a function.
    pub fn from_url_and_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Connector, ConfigError> {
        let mut config: Config = url.parse().map_err(ConfigError::Url)?;
        let in_url = |key: &str| {
            url.split_once('?')
                .is_some_and(|(_, query)| query.split('&').any(|kv| kv.starts_with(key)))
        };
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
        let require_tls = if in_url("sslmode=") {
            config.get_ssl_mode() == SslMode::Require
        } else {
            match env("PGSSLMODE").as_deref() {
                None | Some("disable" | "allow" | "prefer") => false,
                Some("require" | "verify-ca" | "verify-full") => true,
                Some(other) => {
                    return Err(ConfigError::Env {
                        name: "PGSSLMODE",
                        value: other.into(),
                    });
                }
            }
        };
        let tls = if require_tls {
            config.ssl_mode(SslMode::Require);
            Some(tls_connector(env("PGSSLROOTCERT"))?)
        } else {
            config.ssl_mode(SslMode::Disable);
            None
        };
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
        match &self.tls {
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await?;
                Ok((client, Driver::Tls(Box::new(connection))))
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                Ok((client, Driver::Plain(Box::new(connection))))
            }
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
        let manager = match &self.tls {
            Some(tls) => Manager::from_config(self.config.clone(), tls.clone(), manager_config),
            None => Manager::from_config(self.config.clone(), NoTls, manager_config),
        };
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

/// The TLS settings for `sslmode=require`: rustls with the ring provider the
/// server already uses, verifying against the system's CA certificates and
/// those in `extra_roots` (a PEM file).
fn tls_connector(extra_roots: Option<String>) -> Result<MakeRustlsConnect, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_roots {
        use rustls_pki_types::{CertificateDer, pem::PemObject};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
            .and_then(Iterator::collect)
            .map_err(|err| ConfigError::RootCert {
                path: path.clone(),
                detail: err.to_string(),
            })?;
        for cert in certs {
            roots.add(cert).map_err(|err| ConfigError::RootCert {
                path: path.clone(),
                detail: err.to_string(),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(ConfigError::NoRoots(format!("{:?}", native.errors)));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
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
        assert_eq!(c.config.get_ssl_mode(), SslMode::Disable);
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
    fn sslmode_require_turns_on_verified_tls() {
        let c = Connector::from_url_and_env("postgres://a@h/d?sslmode=require", env(&[])).unwrap();
        assert!(c.tls.is_some());
        assert_eq!(c.config.get_ssl_mode(), SslMode::Require);
        assert!(c.to_string().ends_with("(TLS)"));
        let c = Connector::from_url_and_env("postgres://a@h/d", env(&[("PGSSLMODE", "require")]))
            .unwrap();
        assert!(c.tls.is_some());
        // The URL's own sslmode wins over the environment.
        let c = Connector::from_url_and_env(
            "postgres://a@h/d?sslmode=disable",
            env(&[("PGSSLMODE", "require")]),
        )
        .unwrap();
        assert!(c.tls.is_none());
        assert!(matches!(
            Connector::from_url_and_env("postgres://a@h/d", env(&[("PGSSLMODE", "bogus")])),
            Err(ConfigError::Env { .. })
        ));
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
