//! What every mode shares: the connections, the budget that bounds a run,
//! the source of users, progress, and the run from start to report.

use std::{
    error::Error,
    fs::File,
    future::Future,
    io::{self, BufRead, BufReader, IsTerminal},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Status,
    codegen::http::Uri,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use user_service::{
    auth::AuthToken,
    batched_io::BatchedWrites,
    proto::{self, user_service_client::UserServiceClient},
    sample::UserPool,
    server::MAX_MESSAGE_SIZE,
};

use crate::{
    Args, Mode, bulk, list,
    stats::{self, Report, RunInfo, Stats},
    sync, unary,
    verify::{self, VerifyReport},
};

pub type Client = UserServiceClient<Transport>;

/// One HTTP/2 connection, adding the bearer token (if any) to every call.
pub type Transport = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call when there is a token.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Generated users cycle through a pool of this many: enough variety that
/// the server sees realistic rows, small enough to build in milliseconds.
const POOL_SIZE: usize = 65_536;

/// Users read ahead from a `--data` file: keeps the workers fed without
/// loading the file into memory.
const DATA_READ_AHEAD: usize = 4096;

/// HTTP/2 receive windows of the generator's connections. h2's defaults
/// (64 KiB per stream) would make a ListUsers scan wait for window updates
/// every few hundred users on loopback.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// How long to wait for a TCP connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// Bounds a run: claims units of work until the total is reached, the
/// duration is over or Ctrl-C is pressed, whichever comes first.
pub struct Budget {
    total: Option<u64>,
    next: AtomicU64,
    /// Cancelled when no more work may start.
    done: CancellationToken,
    /// Set when Ctrl-C ended the run.
    interrupted: std::sync::atomic::AtomicBool,
}

impl Budget {
    fn new(total: Option<u64>) -> Arc<Budget> {
        Arc::new(Budget {
            total,
            next: AtomicU64::new(0),
            done: CancellationToken::new(),
            interrupted: false.into(),
        })
    }

    /// The index of the next unit of work, or `None` when the run is over.
    pub fn claim(&self) -> Option<u64> {
        if self.done.is_cancelled() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        match self.total {
            Some(total) if n >= total => {
                self.done.cancel();
                None
            }
            _ => Some(n),
        }
    }

    /// Completes when no more work may start.
    pub async fn done(&self) {
        self.done.cancelled().await
    }

    pub fn is_done(&self) -> bool {
        self.done.is_cancelled()
    }
}

/// Where users come from: the generated pool, or a JSON Lines file read by
/// a thread as the workers need them.
pub enum Source {
    Pool(Arc<UserPool>),
    File(Pin<Box<async_channel::Receiver<proto::User>>>),
}

impl Clone for Source {
    fn clone(&self) -> Self {
        match self {
            Source::Pool(pool) => Source::Pool(pool.clone()),
            Source::File(rx) => Source::File(Box::pin(async_channel::Receiver::clone(rx))),
        }
    }
}

/// Problems found while reading `--data`, for the report.
#[derive(Default)]
pub struct DataErrors {
    pub bad_lines: AtomicU64,
    pub first: Mutex<Option<String>>,
}

#[derive(serde::Deserialize)]
struct JsonUser {
    #[serde(default)]
    id: String,
    #[serde(default)]
    first_name: String,
    #[serde(default)]
    last_name: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    verified: bool,
}

impl Source {
    /// Starts reading `path` on its own thread.
    fn file(path: &Path, errors: Arc<DataErrors>) -> std::io::Result<Source> {
        let file = BufReader::new(File::open(path)?);
        let (tx, rx) = async_channel::bounded(DATA_READ_AHEAD);
        std::thread::spawn(move || {
            for (i, line) in file.lines().enumerate() {
                let parsed = line.map_err(|err| err.to_string()).and_then(|line| {
                    if line.trim().is_empty() {
                        return Ok(None);
                    }
                    serde_json::from_str::<JsonUser>(&line)
                        .map(Some)
                        .map_err(|err| err.to_string())
                });
                let user = match parsed {
                    Ok(Some(u)) => proto::User {
                        id: u.id,
                        first_name: u.first_name,
                        last_name: u.last_name,
                        address: u.address,
                        verified: u.verified,
                        version: 0,
                    },
                    Ok(None) => continue,
                    Err(err) => {
                        errors.bad_lines.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = errors.first.lock() {
                            first.get_or_insert(format!("data line {}: {err}", i + 1));
                        }
                        continue;
                    }
                };
                // An error means every worker has stopped reading.
                if tx.send_blocking(user).is_err() {
                    break;
                }
            }
        });
        Ok(Source::File(Box::pin(rx)))
    }

    /// The user for unit `n`, waiting for the file if need be; `None` at the
    /// end of the file.
    pub async fn next(&mut self, n: u64) -> Option<proto::User> {
        std::future::poll_fn(|cx| self.poll_next(n, cx)).await
    }

    pub fn poll_next(&mut self, n: u64, cx: &mut Context<'_>) -> Poll<Option<proto::User>> {
        match self {
            Source::Pool(pool) => Poll::Ready(Some(pool.get(n).clone())),
            Source::File(rx) => rx.poll_next_unpin(cx),
        }
    }
}

/// Everything a mode needs.
pub struct Ctx {
    pub clients: Vec<Client>,
    /// The connections under `clients`, for calls made without the
    /// generated client (see `list`).
    pub channels: Vec<Transport>,
    pub concurrency: usize,
    pub budget: Arc<Budget>,
    pub source: Source,
    pub timeout: Duration,
    /// Unique to this run: client-chosen ids start with it.
    pub run_id: String,
    /// `Some(run_id)` when `--verify` is on: write modes then choose ids.
    pub id_prefix: Option<String>,
    /// Units finished, for the progress bar.
    pub progress: Arc<AtomicU64>,
    pub args: RunArgs,
}

/// The mode-specific options.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub rps: Option<u64>,
    pub per_stream: Option<u64>,
    pub limit: u32,
    pub watchers: usize,
    pub verify: bool,
}

impl Ctx {
    /// Worker `i`'s client: workers are spread evenly over the connections.
    pub fn client(&self, i: usize) -> Client {
        self.clients[i % self.clients.len()].clone()
    }

    /// Worker `i`'s connection, the one under `client(i)`.
    pub fn channel(&self, i: usize) -> Transport {
        self.channels[i % self.channels.len()].clone()
    }

    pub fn watchers(&self) -> usize {
        self.args.watchers
    }
}

/// What a mode hands back.
#[derive(Default)]
pub struct Outcome {
    pub stats: Stats,
    /// Ids the server reported stored (only with `--verify`).
    pub stored_ids: Vec<String>,
    /// Rows the server reported failed without saying which (a BulkAddUsers
    /// reply lists only the first 100 failures).
    pub unlisted_failures: u64,
    /// list with `--verify`: users out of strict id order.
    pub order_violations: u64,
}

impl Outcome {
    /// Waits for every worker and adds up what they report; a worker that
    /// panicked is reported as an error.
    pub async fn gather(mut workers: tokio::task::JoinSet<Outcome>) -> Outcome {
        let mut outcome = Outcome::default();
        while let Some(result) = workers.join_next().await {
            match result {
                Ok(worker) => outcome.merge(worker),
                Err(err) => outcome.stats.error(format!("worker failed: {err}")),
            }
        }
        outcome
    }

    pub fn merge(&mut self, other: Outcome) {
        self.stats.merge(other.stats);
        self.stored_ids.extend(other.stored_ids);
        self.unlisted_failures += other.unlisted_failures;
        self.order_violations += other.order_violations;
    }
}

/// A UserService client on `channel`, with the generator's message limits.
pub fn client_on(channel: Transport) -> Client {
    UserServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// Opens the `--connections` HTTP/2 connections to `--addr`, with TLS and
/// the bearer token when asked for.
pub async fn connect(args: &Args) -> Result<Vec<Transport>, Box<dyn Error>> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|err| format!("reading {}: {err}", path.display()))
    };
    let scheme = if args.cacert.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", args.addr))?
        .connect_timeout(CONNECT_TIMEOUT)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    if let Some(ca) = &args.cacert {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &args.cname {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let bearer = match &args.auth_token_file {
        Some(path) => Bearer(Some(AuthToken::from_file(path)?.header_value())),
        None => Bearer::default(),
    };
    let count = args.connections.max(1);
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        // Each `connect` opens its own connection.
        let channel = endpoint.connect_with_connector(Connector).await?;
        channels.push(InterceptedService::new(channel, bearer.clone()));
    }
    Ok(channels)
}

/// Opens the TCP connection of a channel: no Nagle delay, and writes held
/// until a flush that first lets the other ready tasks run, as the server's
/// are (`user_service::batched_io`), so that requests issued together by
/// many workers share writes.
#[derive(Debug, Clone, Copy)]
struct Connector;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<BatchedWrites<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let addr = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host:port"))?
                .to_string();
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(BatchedWrites::new(stream)))
        })
    }
}

/// Runs the mode `args` asks for and reports.
pub async fn run(args: &Args) -> Result<Report, Box<dyn Error>> {
    let channels = connect(args).await?;
    let clients = channels.iter().cloned().map(client_on).collect();
    let data_errors = Arc::new(DataErrors::default());
    let source = match &args.data {
        Some(path) => Source::file(path, data_errors.clone())
            .map_err(|err| format!("--data {}: {err}", path.display()))?,
        None => Source::Pool(Arc::new(UserPool::new(POOL_SIZE, args.seed))),
    };
    // Ids of this run sort together and apart from other runs'.
    let run_id = format!("ld{:08x}", fastrand::u32(..));
    let mut ctx = Ctx {
        clients,
        channels,
        concurrency: args.concurrency(),
        budget: Budget::new(args.total),
        source,
        timeout: args.timeout,
        id_prefix: args.verify.then(|| run_id.clone()),
        run_id: run_id.clone(),
        progress: Arc::new(AtomicU64::new(0)),
        args: RunArgs {
            rps: args.rps.filter(|&rps| rps > 0),
            per_stream: args.per_stream.filter(|&n| n > 0),
            limit: args.limit,
            watchers: args.watchers,
            verify: args.verify,
        },
    };

    // Untimed setup: the users that get reads, or that list scans.
    let prefill = args.prefill.unwrap_or(match args.mode {
        Mode::Get => 10_000,
        _ => 0,
    });
    let get_ids = if prefill > 0 {
        let prefix = format!("{run_id}-p");
        import_users(&ctx, &prefix, prefill, args.seed).await?
    } else {
        Vec::new()
    };
    if args.mode == Mode::Get && get_ids.is_empty() {
        return Err("get reads the users it imports first: use --prefill 1 or more".into());
    }

    // Bounds: the duration runs from here; Ctrl-C ends the run early.
    let budget = ctx.budget.clone();
    if let Some(duration) = args.duration() {
        let budget = budget.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(duration) => budget.done.cancel(),
                () = budget.done() => {}
            }
        });
    }
    {
        let budget = budget.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = tokio::signal::ctrl_c() => if result.is_ok() {
                    budget.interrupted.store(true, Ordering::Relaxed);
                    budget.done.cancel();
                },
                () = budget.done() => {}
            }
        });
    }
    let progress = show_progress(&ctx, args);

    let cpu_start = stats::process_cpu();
    let start = Instant::now();
    let mut outcome = match args.mode {
        Mode::Bulk => bulk::run(&ctx).await,
        Mode::Add => unary::run(&ctx, unary::Kind::Add).await,
        Mode::Get => unary::run(&ctx, unary::Kind::Get(Arc::new(get_ids))).await,
        Mode::List => list::run(&ctx).await,
        Mode::Sync => sync::run(&ctx).await,
        Mode::Sink => unreachable!("sink serves instead of running"),
    };
    let elapsed = start.elapsed();
    let cpu = stats::process_cpu().saturating_sub(cpu_start);
    budget.done.cancel();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    let bad_lines = data_errors.bad_lines.load(Ordering::Relaxed);
    if bad_lines > 0 {
        let first = data_errors.first.lock().ok().and_then(|f| f.clone());
        outcome.stats.error(format!(
            "{bad_lines} unreadable data line(s), first: {}",
            first.unwrap_or_default()
        ));
    }

    let verify = if args.verify {
        Some(match args.mode {
            Mode::List => VerifyReport::order(outcome.order_violations, outcome.stats.users),
            Mode::Get => VerifyReport::reads(&outcome.stats),
            _ => {
                let mut client = ctx.client(0);
                verify::stored(
                    &mut client,
                    ctx.id_prefix.as_deref(),
                    std::mem::take(&mut outcome.stored_ids),
                    outcome.unlisted_failures,
                )
                .await
            }
        })
    } else {
        None
    };
    ctx.clients.clear();
    ctx.channels.clear();

    let info = RunInfo {
        mode: args.mode,
        addr: args.addr.to_string(),
        concurrency: args.concurrency(),
        connections: args.connections.max(1),
        interrupted: budget.interrupted.load(Ordering::Relaxed),
        elapsed,
        cpu,
    };
    Ok(Report::new(info, outcome.stats, verify))
}

/// Imports `count` users with ids `{prefix}{n}` through BulkAddUsers and
/// returns their ids.
async fn import_users(
    ctx: &Ctx,
    prefix: &str,
    count: u64,
    seed: u64,
) -> Result<Vec<String>, Box<dyn Error>> {
    let pool = UserPool::new(POOL_SIZE, seed);
    let ids: Vec<String> = (0..count).map(|n| format!("{prefix}{n:010}")).collect();
    let rows: Vec<proto::User> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| proto::User {
            id: id.clone(),
            ..pool.get(n as u64).clone()
        })
        .collect();
    let reply = ctx
        .client(0)
        .bulk_add_users(futures::stream::iter(rows))
        .await
        .map_err(|status| format!("prefill: {:?}: {}", status.code(), status.message()))?
        .into_inner();
    if reply.added != count {
        return Err(format!("prefill: {} of {count} users added", reply.added).into());
    }
    Ok(ids)
}

/// A progress bar on stderr, only when it is a terminal.
fn show_progress(ctx: &Ctx, args: &Args) -> Option<ProgressBar> {
    if args.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let duration = args.duration();
    let bar = match (args.total, duration) {
        (Some(total), _) => ProgressBar::new(total),
        (None, Some(d)) => ProgressBar::new(d.as_millis() as u64),
        (None, None) => ProgressBar::new_spinner(),
    };
    let by_time = args.total.is_none() && duration.is_some();
    let template = if by_time {
        "{spinner} [{elapsed_precise}] {wide_bar} {msg}"
    } else {
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    let (progress, budget, shown) = (ctx.progress.clone(), ctx.budget.clone(), bar.clone());
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(PROGRESS_TICK);
        while !budget.is_done() {
            tick.tick().await;
            let done = progress.load(Ordering::Relaxed);
            let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-3);
            if by_time {
                shown.set_position(start.elapsed().as_millis() as u64);
            } else {
                shown.set_position(done);
            }
            shown.set_message(format!("{done} done, {rate:.0}/s"));
        }
    });
    Some(bar)
}
