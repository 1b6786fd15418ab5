//! Metrics read at each scrape from the counts the server keeps anyway
//! (atomics in [`Gauges`] and [`ConnectionStats`], the store's own figures,
//! `/proc`): nothing is recorded on the hot path for them.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use crate::{
    gauges::{Gauges, Limit},
    store::Store,
    transport::ConnectionStats,
};

/// A store, as the collector sees it: what it reports of itself at each
/// scrape ([`Store::encode_metrics`]).
pub trait StoreMetrics: Send + Sync + 'static {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error>;
}

impl<S: Store> StoreMetrics for S {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_metrics(encoder)
    }
}

/// Encodes one metric without labels.
fn encode(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let metric_encoder = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(metric_encoder)
}

fn gauge(value: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabel {
    site: &'static str,
}

/// The service's own figures: what is open, what was refused, the feed's
/// subscribers, and the store.
pub struct ServiceCollector {
    pub gauges: Gauges,
    pub connections: ConnectionStats,
    pub store: Box<dyn StoreMetrics>,
}

impl std::fmt::Debug for ServiceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCollector").finish_non_exhaustive()
    }
}

impl Collector for ServiceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let g = &self.gauges;
        encode(
            &mut encoder,
            "user_service_calls_in_flight",
            "UserService calls in flight (a stream counts until it ends)",
            gauge(g.in_flight_calls() as u64),
        )?;
        encode(
            &mut encoder,
            "user_service_feed_subscribers",
            "SyncUsers streams open, each subscribed to the change feed",
            gauge(g.subscribers() as u64),
        )?;
        encode(
            &mut encoder,
            "user_service_feed_subscribers_lagged",
            "SyncUsers streams ended with ABORTED for falling too far behind the change feed",
            ConstCounter::new(g.lagged()),
        )?;
        let mut refused = encoder.encode_descriptor(
            "user_service_calls_refused",
            "Calls refused at once by a limit: in_flight (--max-in-flight-calls), subscribers (--max-subscribers), auth (the bearer token)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for limit in Limit::ALL {
            let label = LimitLabel {
                limit: limit.name(),
            };
            ConstCounter::new(g.refused(limit)).encode(refused.encode_family(&label)?)?;
        }

        let c = &self.connections;
        for (name, help, value) in [
            (
                "user_service_connections_accepted",
                "Connections accepted and served",
                c.accepted(),
            ),
            (
                "user_service_connections_refused",
                "Connections closed at once because --max-connections were open",
                c.refused(),
            ),
            (
                "user_service_connections_handshake_timeouts",
                "Connections closed because their handshake did not finish in time",
                c.handshake_timeouts(),
            ),
            (
                "user_service_connections_idle_closed",
                "Connections sent GOAWAY after --max-connection-idle without a call",
                c.idle_closed(),
            ),
            (
                "user_service_connections_aged_out",
                "Connections sent GOAWAY at --max-connection-age",
                c.aged_out(),
            ),
            (
                "user_service_accept_errors",
                "Failed accepts not about one connection (descriptors exhausted, for instance)",
                c.accept_errors(),
            ),
        ] {
            encode(&mut encoder, name, help, ConstCounter::new(value))?;
        }
        encode(
            &mut encoder,
            "user_service_connections_open",
            "Connections open",
            gauge(c.open()),
        )?;
        let mut panics = encoder.encode_descriptor(
            "user_service_panics",
            "Panics caught, the server serving on: in a call's handler or response stream (site=handler; the call ends INTERNAL), in a call's task (site=call; its stream is reset) or in a connection's task (site=connection; the connection is closed)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (site, count) in [
            ("handler", g.panicked_calls()),
            ("call", c.panicked_calls()),
            ("connection", c.panicked_connections()),
        ] {
            ConstCounter::new(count).encode(panics.encode_family(&SiteLabel { site })?)?;
        }

        self.store.encode(&mut encoder)
    }
}

/// The process: CPU time, memory, descriptors (Linux, from `/proc`), under
/// the names every Prometheus client library uses.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A process that cannot read its own /proc reports nothing rather
        // than failing the scrape.
        let Ok(process) = procfs::process::Process::myself() else {
            return Ok(());
        };
        if let Ok(stat) = process.stat() {
            let ticks = procfs::ticks_per_second() as f64;
            encode(
                &mut encoder,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                ConstCounter::new((stat.utime + stat.stime) as f64 / ticks),
            )?;
            encode(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                gauge(stat.rss * procfs::page_size()),
            )?;
            encode(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                gauge(stat.vsize),
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                encode(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    ConstGauge::new(boot as f64 + stat.starttime as f64 / ticks),
                )?;
            }
        }
        if let Ok(open) = process.fd_count() {
            encode(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                gauge(open as u64),
            )?;
        }
        if let Ok(limits) = process.limits()
            && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
        {
            encode(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                gauge(max),
            )?;
        }
        Ok(())
    }
}
