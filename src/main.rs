//! The `user-service` binary: parses flags, sets up logging and signals, and
//! hands everything else to the library.

use std::{
    io::{self, IsTerminal},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use user_service::{
    Config, MemoryStore, Store,
    auth::{AuthToken, AuthTokenError},
    server::{self, ServeError, TlsConfig},
    store::{
        StoreLocation,
        postgres::{self, PostgresOptions, PostgresStore},
        sqlite::{Durability, OpenError, SqliteOptions, SqliteStore},
    },
    telemetry::{
        self,
        spans::StderrSpans,
        trace::{ExportError, Exporter},
    },
};

/// mimalloc instead of the system allocator: every call allocates and frees
/// many small objects (decoded messages, stored users, encoded replies), and
/// glibc's malloc and free were a sixth of the server's CPU time in a bulk
/// import profile (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How far a SyncUsers stream may fall behind the change feed, in changes,
/// before it is ended with ABORTED. At ~100 bytes a change this is a few MB
/// shared by all subscribers.
const DEFAULT_FEED_CAPACITY: usize = 65_536;

/// A gRPC user service: AddUser, GetUser, ListUsers, BulkAddUsers, SyncUsers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,

    #[command(flatten)]
    telemetry: TelemetryArgs,

    #[command(flatten)]
    store: StoreArgs,

    #[command(flatten)]
    server: Config,

    #[command(flatten)]
    security: SecurityArgs,
}

/// Where the server listens, and where it says so.
#[derive(Debug, clap::Args)]
struct ListenArgs {
    /// Address to listen on: HOST:PORT, where HOST is an IP address or a
    /// name (`localhost:8080`); port 0 lets the system pick a free port.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,

    /// Serve Prometheus metrics at `http://HOST:PORT/metrics` (off by
    /// default; with it, every call is recorded).
    #[arg(long, env = "USER_SERVICE_METRICS_ADDR")]
    metrics_addr: Option<String>,

    /// Once listening, write the address the server bound (`IP:PORT` and a
    /// newline) to this file, atomically: for scripts and tests that start
    /// it on port 0.
    #[arg(long, env = "USER_SERVICE_ADDR_FILE")]
    addr_file: Option<PathBuf>,
}

/// What the server reports besides its metrics, and how.
#[derive(Debug, clap::Args)]
struct TelemetryArgs {
    /// Export OpenTelemetry traces over OTLP/gRPC to this collector URL
    /// (`http://HOST:4317`); off by default. A call's span continues the
    /// client's trace when it sends a W3C `traceparent`.
    #[arg(long, env = "USER_SERVICE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,

    /// Write each trace span to stderr as it ends, one line in the log's
    /// format: traces without a collector (with --otlp-endpoint too, both).
    #[arg(long, env = "USER_SERVICE_TRACE_STDERR")]
    trace_stderr: bool,

    /// Log format on stderr: `text` for people, `json` (one object a line)
    /// for log shippers.
    #[arg(long, env = "USER_SERVICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Where users are kept, and how.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// Where users are kept: a SQLite file, kept across restarts
    /// (`sqlite:PATH` or a bare path relative to the working directory,
    /// `sqlite:///ABSOLUTE/PATH`), `postgres://USER@HOST:PORT/DB` (a
    /// PostgreSQL database that replicas of this server share; libpq-style,
    /// the `PG*` variables fill in what it leaves out) or `memory` (lost on
    /// exit).
    #[arg(long, env = "USER_SERVICE_STORE", default_value = "sqlite:users.db")]
    store: StoreLocation,

    /// How far a SyncUsers subscriber may lag, in changes, before its stream
    /// is ended with ABORTED.
    #[arg(long, env = "USER_SERVICE_FEED_CAPACITY", default_value_t = DEFAULT_FEED_CAPACITY)]
    feed_capacity: usize,

    /// SQLite only: `full` fsyncs every commit before acknowledging it
    /// (survives power loss); `normal` does not (survives a process crash).
    #[arg(long, env = "USER_SERVICE_SYNC", value_enum, default_value_t = SyncArg::Full)]
    sync: SyncArg,

    /// PostgreSQL only: keep at most this many of the latest changes in the
    /// changelog that replicas' change feeds read.
    #[arg(long, env = "USER_SERVICE_CHANGELOG_KEEP", default_value_t = postgres::DEFAULT_RETENTION.keep)]
    changelog_keep: u64,

    /// PostgreSQL only: and none older than this many minutes. A replica cut
    /// off from the database for longer ends its SyncUsers streams with
    /// ABORTED when it is back.
    #[arg(long, env = "USER_SERVICE_CHANGELOG_KEEP_MINUTES", default_value_t = postgres::DEFAULT_RETENTION.keep_for.as_secs() / 60)]
    changelog_keep_minutes: u64,

    /// PostgreSQL only: seconds between two prunings of the changelog.
    #[arg(long, env = "USER_SERVICE_CHANGELOG_PRUNE_INTERVAL", default_value_t = postgres::DEFAULT_RETENTION.every.as_secs())]
    changelog_prune_interval: u64,

    /// PostgreSQL only: whether commits wake the other replicas' feeds with
    /// NOTIFY; `false` for an engine without LISTEN/NOTIFY (feeds then poll).
    #[arg(long, env = "USER_SERVICE_CHANGELOG_NOTIFY", default_value_t = true, action = clap::ArgAction::Set)]
    changelog_notify: bool,

    /// PostgreSQL only: milliseconds between two reads of the changelog when
    /// nothing woke the feed (the safety net under NOTIFY, the latency of the
    /// feed without it).
    #[arg(long, env = "USER_SERVICE_CHANGELOG_POLL_MS", default_value_t = postgres::DEFAULT_POLL_INTERVAL.as_millis() as u64)]
    changelog_poll_ms: u64,
}

/// Who may call: the token and the TLS files, read before the server binds.
#[derive(Debug, clap::Args)]
struct SecurityArgs {
    /// File holding a bearer token that UserService and reflection calls
    /// must present (`authorization: Bearer <token>`).
    #[arg(long, env = "USER_SERVICE_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,

    /// Server certificate chain (PEM); serves TLS only. Needs --tls-key.
    #[arg(long, env = "USER_SERVICE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// Server private key (PEM). Needs --tls-cert.
    #[arg(long, env = "USER_SERVICE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// CA certificate (PEM) that client certificates must chain to: turns on
    /// mutual TLS, refusing clients without a valid certificate.
    #[arg(long, env = "USER_SERVICE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

/// The `--log-format` flag.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The `--sync` flag.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SyncArg {
    Full,
    Normal,
}

/// Why the server did not start, or stopped with an error. Each has its
/// own exit status (the `sysexits.h` codes where one fits).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("cannot use the auth token file {}: {source}", path.display())]
    Token {
        path: PathBuf,
        source: AuthTokenError,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot open the store: {0}")]
    Store(#[from] OpenError),
    #[error("cannot open the store: {0}")]
    Postgres(#[from] postgres::OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("cannot write the address file {}: {source}", path.display())]
    AddrFile { path: PathBuf, source: io::Error },
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
    #[error("{0}")]
    Traces(#[from] ExportError),
    #[error("{0}")]
    Serve(#[from] ServeError),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            // EX_DATAERR: a store file that is not ours, corrupted or newer.
            Failure::Store(err) if err.is_refusal() => 65,
            // EX_TEMPFAIL: another server holds the store file. A condition
            // that ends when that server exits (its lock goes with its
            // process, even under kill -9): retrying later is the remedy,
            // as a supervisor restarting the service would.
            Failure::Store(err) if err.is_locked() => 75,
            Failure::Postgres(err) if err.is_refusal() => 65,
            // EX_UNAVAILABLE: the database cannot be reached.
            Failure::Postgres(err) if err.is_unreachable() => 69,
            // EX_CONFIG: a URL, an sslmode, a root certificate that cannot
            // be used, a database that does not exist.
            Failure::Postgres(postgres::OpenError::Config(_)) => 78,
            // EX_CONFIG: a token, certificate or key that cannot be used.
            Failure::Token { .. } | Failure::Read { .. } | Failure::Serve(ServeError::Tls(_)) => 78,
            // EX_UNAVAILABLE: the address is taken, or not ours to bind.
            Failure::Listen { .. } => 69,
            // EX_CANTCREAT: the address file cannot be written.
            Failure::AddrFile { .. } => 73,
            // EX_CONFIG too: an endpoint that is not a URL.
            Failure::Traces(_) => 78,
            Failure::Store(_) | Failure::Postgres(_) | Failure::Runtime(_) => 1,
        })
    }
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`: no other thread exists yet.
    unsafe { user_service::allocator::tune_mimalloc() };
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail_early(Failure::Runtime(err)),
    };
    // Started on the runtime, whose tasks send the spans.
    let telemetry = &args.telemetry;
    let exporter = if telemetry.otlp_endpoint.is_some() || telemetry.trace_stderr {
        let stderr = telemetry
            .trace_stderr
            .then(|| StderrSpans::new(matches!(telemetry.log_format, LogFormat::Json)));
        let endpoint = telemetry.otlp_endpoint.as_deref();
        match runtime.block_on(async { Exporter::start(endpoint, stderr) }) {
            Ok(exporter) => Some(exporter),
            Err(err) => return fail_early(Failure::Traces(err)),
        }
    } else {
        None
    };
    init_logging(
        args.telemetry.log_format,
        args.server.access_log,
        exporter.as_ref(),
    );
    raise_open_files_limit();
    let result = runtime.block_on(serve(args));
    // The runtime still runs: the last spans can go out.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            tracing::error!("{failure}");
            failure.exit_code()
        }
    }
}

/// A failure before logging is set up: said on stderr.
fn fail_early(failure: Failure) -> ExitCode {
    eprintln!("user-service: {failure}");
    failure.exit_code()
}

/// Logs to stderr, as text coloured only when stderr is a terminal (and
/// `NO_COLOR` is not set), or as JSON lines; the level comes from
/// `RUST_LOG`, `info` by default; with `access_log`, the access log's
/// lines are written whatever the level, unless `RUST_LOG` names their
/// target. With `exporter`, the trace spans
/// go to it (and never to the log).
fn init_logging(format: LogFormat, access_log: bool, exporter: Option<&Exporter>) {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let directive = |text: String| text.parse().expect("a valid directive");
    let mut filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(directive(format!("{}=off", telemetry::trace::TARGET)));
    // Unless RUST_LOG says otherwise of the access log itself.
    let named = std::env::var("RUST_LOG").is_ok_and(|v| v.contains(telemetry::access::TARGET));
    if access_log && !named {
        filter = filter.add_directive(directive(format!("{}=info", telemetry::access::TARGET)));
    }
    let logs = tracing_subscriber::fmt::layer().with_writer(io::stderr);
    let logs = match format {
        LogFormat::Text => {
            let colour = io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            logs.with_ansi(colour).with_filter(filter).boxed()
        }
        LogFormat::Json => logs
            .json()
            .with_current_span(false)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(exporter.map(Exporter::layer))
        .init();
}

/// Raises the soft limit on open files to the hard limit, as most servers
/// do: each connection is a descriptor, and the soft limit is often 1024.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open files"),
        Err(err) => tracing::warn!(%err, "cannot raise the open files limit"),
    }
}

async fn serve(args: Args) -> Result<(), Failure> {
    let Args {
        listen,
        store,
        server: mut config,
        security,
        ..
    } = args;
    // Key material and the token are read before binding: a server that
    // cannot start securely never starts listening.
    config.auth_token = security.auth_token()?;
    config.tls = security.tls()?;
    let feed_capacity = store.feed_capacity.max(1);
    match &store.store {
        StoreLocation::Memory => {
            let memory = MemoryStore::new(feed_capacity);
            let described = Described {
                store: "memory".into(),
                durability: "none (users are lost on exit)".into(),
            };
            listen_and_run(memory, described, &listen, config).await
        }
        StoreLocation::Sqlite(path) => {
            let durability = match store.sync {
                SyncArg::Full => Durability::Full,
                SyncArg::Normal => Durability::Normal,
            };
            let options = SqliteOptions {
                durability,
                feed_capacity,
            };
            // Opened before binding: a refused file stops the server before
            // it accepts anything.
            let sqlite = SqliteStore::open(path, options)?;
            let described = Described {
                store: format!("sqlite:{}", path.display()),
                durability: durability.to_string(),
            };
            listen_and_run(sqlite, described, &listen, config).await
        }
        StoreLocation::Postgres(url) => {
            let options = PostgresOptions {
                retention: postgres::Retention {
                    keep: store.changelog_keep,
                    keep_for: Duration::from_secs(store.changelog_keep_minutes * 60),
                    every: Duration::from_secs(store.changelog_prune_interval.max(1)),
                },
                notify: store.changelog_notify,
                poll_interval: Duration::from_millis(store.changelog_poll_ms.max(1)),
                ..PostgresOptions::new(feed_capacity)
            };
            // Opened before binding, as SQLite: a refused schema or an
            // unreachable database stops the server before it accepts.
            let postgres = PostgresStore::open(url, options).await?;
            let described = Described {
                store: postgres.target(),
                durability: "as the database commits (synchronous_commit)".into(),
            };
            listen_and_run(postgres, described, &listen, config).await
        }
    }
}

impl SecurityArgs {
    /// The token of `--auth-token-file`, if given.
    fn auth_token(&self) -> Result<Option<AuthToken>, Failure> {
        let Some(path) = &self.auth_token_file else {
            return Ok(None);
        };
        AuthToken::new(&read_text(path)?)
            .map(Some)
            .map_err(|source| Failure::Token {
                path: path.clone(),
                source,
            })
    }

    /// The key material of `--tls-cert`, `--tls-key` and `--tls-client-ca`,
    /// if given.
    fn tls(&self) -> Result<Option<TlsConfig>, Failure> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        Ok(Some(TlsConfig {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: self.tls_client_ca.as_deref().map(read).transpose()?,
        }))
    }
}

/// How the startup log line names the store.
struct Described {
    store: String,
    durability: String,
}

/// Binds the address, says so, and serves until a signal.
async fn listen_and_run<S: Store>(
    store: S,
    described: Described,
    listen: &ListenArgs,
    config: Config,
) -> Result<(), Failure> {
    // Before anything says the server is up.
    let signal = shutdown_signal();
    let listen_failed = |addr: &str| {
        let addr = addr.to_owned();
        move |source| Failure::Listen { addr, source }
    };
    let listener = TcpListener::bind(&listen.addr)
        .await
        .map_err(listen_failed(&listen.addr))?;
    let addr = listener.local_addr().map_err(listen_failed(&listen.addr))?;
    let metrics = match &listen.metrics_addr {
        Some(metrics_addr) => {
            let failed = listen_failed(metrics_addr);
            let listener = TcpListener::bind(metrics_addr).await.map_err(failed)?;
            let local = listener.local_addr().map_err(listen_failed(metrics_addr))?;
            tracing::info!(addr = %local, "metrics at http://{local}/metrics");
            Some(listener)
        }
        None => None,
    };
    tracing::info!(
        %addr,
        store = %described.store,
        durability = %described.durability,
        "user-service listening"
    );
    log_security(&config);
    if let Some(path) = &listen.addr_file {
        write_addr_file(path, addr).map_err(|source| Failure::AddrFile {
            path: path.clone(),
            source,
        })?;
    }
    let listeners = server::Listeners {
        grpc: listener,
        metrics,
    };
    let served = server::run(listeners, store.clone(), config, signal).await;
    // Closing checkpoints the SQLite write-ahead log into the file and
    // removes it: the file alone then holds every user. A PostgreSQL store
    // commits what is queued and closes its connections.
    store.close().await;
    Ok(served?)
}

/// Writes `addr` to `path` so that a reader never sees a partial file: to a
/// temporary file beside it, then renamed over it.
fn write_addr_file(path: &Path, addr: SocketAddr) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    std::fs::write(&temporary, format!("{addr}\n"))?;
    std::fs::rename(&temporary, path)
}

/// Logs which protections are on (never the token itself).
fn log_security(config: &Config) {
    tracing::info!(
        tls = config.tls.is_some(),
        mutual_tls = config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_pem.is_some()),
        auth_token = config.auth_token.is_some(),
        "security"
    );
}

/// Reads a text file named by a flag, saying which one failed.
fn read_text(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|source| Failure::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a file named by a flag, saying which one failed.
fn read(path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|source| Failure::Read {
        path: path.to_owned(),
        source,
    })
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed
/// when this is called, not when the future is first polled: a signal sent
/// the moment the address file appears (by a supervisor, or a test) is a
/// graceful shutdown, never the default action's exit on the spot.
#[cfg(unix)]
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};

    fn install(kind: SignalKind, name: &str) -> Option<Signal> {
        signal(kind)
            .inspect_err(|err| tracing::error!(%err, "cannot listen for {name}"))
            .ok()
    }
    async fn received(signal: Option<Signal>) {
        match signal {
            Some(mut signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let interrupt = install(SignalKind::interrupt(), "Ctrl-C");
    let terminate = install(SignalKind::terminate(), "SIGTERM");
    async move {
        tokio::select! {
            () = received(interrupt) => tracing::info!("received Ctrl-C"),
            () = received(terminate) => tracing::info!("received SIGTERM"),
        }
    }
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl Future<Output = ()> {
    async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => tracing::info!("received Ctrl-C"),
            Err(err) => {
                tracing::error!(%err, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    }
}
