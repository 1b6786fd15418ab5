//! What a writer's commits add up to, for the metrics endpoint: recorded
//! once per commit by [`super::group_commit::GroupCommit`] (never per call),
//! read at each scrape.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        histogram::Histogram,
    },
};

use super::{StoreError, group_commit::Writes};
use crate::user::{Change, ChangeKind};

/// Buckets of the ops-per-commit histogram: 1 (a lone write) to 8192
/// ([`MAX_BATCH_OPS`](super::group_commit::MAX_BATCH_OPS)), doubling.
const BATCH_OPS_BUCKETS: [f64; 14] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// Buckets of the commit-duration histogram: 50 µs to 1 s.
const BATCH_SECONDS_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// What a writer's commits add up to, for the metrics endpoint: recorded
/// once per commit (never per call), read at each scrape. Cheap to clone;
/// clones share the figures.
#[derive(Debug, Clone)]
pub struct WriteStats {
    inner: Arc<WriteStatsInner>,
}

#[derive(Debug)]
struct WriteStatsInner {
    batch_ops: Histogram,
    batch_seconds: Histogram,
    failed_commits: Counter,
    /// Users stored and the seq of the last change, kept up to date from
    /// the committed changes once the store has set them at open.
    users: AtomicI64,
    last_seq: AtomicU64,
}

impl Default for WriteStats {
    fn default() -> Self {
        WriteStats {
            inner: Arc::new(WriteStatsInner {
                batch_ops: Histogram::new(BATCH_OPS_BUCKETS),
                batch_seconds: Histogram::new(BATCH_SECONDS_BUCKETS),
                failed_commits: Counter::default(),
                users: AtomicI64::new(0),
                last_seq: AtomicU64::new(0),
            }),
        }
    }
}

impl WriteStats {
    /// Sets the users stored and the last seq, as the store found them when
    /// it opened.
    pub fn start_from(&self, users: u64, last_seq: u64) {
        let users = i64::try_from(users).unwrap_or(i64::MAX);
        self.inner.users.store(users, Ordering::Relaxed);
        self.inner.last_seq.store(last_seq, Ordering::Relaxed);
    }

    /// Users stored, as far as the commits tell.
    pub fn users(&self) -> u64 {
        self.inner.users.load(Ordering::Relaxed).max(0) as u64
    }

    /// The seq of the last committed change.
    pub fn last_seq(&self) -> u64 {
        self.inner.last_seq.load(Ordering::Relaxed)
    }

    pub(super) fn committed(
        &self,
        ops: usize,
        took: Duration,
        changes: &[Result<Change, StoreError>],
    ) {
        self.inner.batch_ops.observe(ops as f64);
        self.inner.batch_seconds.observe(took.as_secs_f64());
        let mut users = 0;
        let mut last_seq = None;
        for change in changes.iter().flatten() {
            match change.kind {
                ChangeKind::Created => users += 1,
                ChangeKind::Deleted => users -= 1,
                ChangeKind::Updated => {}
            }
            last_seq = Some(change.seq);
        }
        self.inner.users.fetch_add(users, Ordering::Relaxed);
        if let Some(seq) = last_seq {
            self.inner.last_seq.fetch_max(seq, Ordering::Relaxed);
        }
    }

    pub(super) fn failed(&self, took: Duration) {
        self.inner.batch_seconds.observe(took.as_secs_f64());
        self.inner.failed_commits.inc();
    }

    /// Encodes the figures, with the depth of `writes`' queue.
    pub fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        writes: &Writes,
    ) -> Result<(), std::fmt::Error> {
        encode_contents(encoder, self.users(), self.last_seq())?;
        self.encode_commits(encoder, writes)
    }

    /// Encodes the commit figures alone (not users and the last seq), with
    /// the depth of `writes`' queue: for a store that knows those better
    /// than its own commits can tell (one of several replicas).
    pub fn encode_commits(
        &self,
        encoder: &mut DescriptorEncoder,
        writes: &Writes,
    ) -> Result<(), std::fmt::Error> {
        let i = &self.inner;
        let metrics: [(&str, &str, &dyn EncodeMetric); 4] = [
            (
                "user_service_write_batch_ops",
                "Ops (users created, upserts, deletes) per commit of the store's writer",
                &i.batch_ops,
            ),
            (
                "user_service_write_batch_seconds",
                "How long each commit of the store's writer took, failed ones included",
                &i.batch_seconds,
            ),
            (
                "user_service_write_commits_failed",
                "Commits that failed, each failing every write of its batch",
                &ConstCounter::new(i.failed_commits.get()),
            ),
            (
                "user_service_write_queue_depth",
                "Write commands waiting for the store's writer",
                &ConstGauge::new(writes.queued() as i64),
            ),
        ];
        for (name, help, metric) in metrics {
            let metric_encoder =
                encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(metric_encoder)?;
        }
        Ok(())
    }
}

/// Encodes the users stored and the seq of the last change, as every store
/// reports them.
pub fn encode_contents(
    encoder: &mut DescriptorEncoder,
    users: u64,
    last_seq: u64,
) -> Result<(), std::fmt::Error> {
    let metrics: [(&str, &str, i64); 2] = [
        (
            "user_service_users",
            "Users stored",
            i64::try_from(users).unwrap_or(i64::MAX),
        ),
        (
            "user_service_last_seq",
            "The seq of the last committed change",
            i64::try_from(last_seq).unwrap_or(i64::MAX),
        ),
    ];
    for (name, help, value) in metrics {
        let gauge = ConstGauge::new(value);
        let metric_encoder = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
        gauge.encode(metric_encoder)?;
    }
    Ok(())
}
