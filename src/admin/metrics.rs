//! `/metrics`: the Prometheus text exposition format (version 0.0.4), encoded by
//! `prometheus-client` (the Prometheus project's Rust client).
//!
//! The values live in atomics the pipeline and the sink runners update ([`crate::telemetry`],
//! the sinks' gauges); each scrape reads them once into a [`Page`], a collector the client
//! encodes: `# HELP` and `# TYPE` for every family, contiguous samples, escaped label values,
//! `_total` on counters (the client appends it, so counters are named here without it). Feed
//! and sink names are validated names; event types come from the streams, so their number per
//! feed is bounded (see [`crate::telemetry::MAX_TYPES`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tokio::time::Instant;

use super::server::AdminState;
use crate::sse::status::{FeedStatus, ReadyState, ERROR_CLASSES};
use crate::supervisor::{FeedView, SinkView};
use crate::telemetry::{HistogramSnapshot, TypeStats};

/// The media type of the text format (version 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What one scrape sees of a feed, read once.
pub(super) struct FeedSnapshot {
    pub view: FeedView,
    pub status: FeedStatus,
    pub types: Vec<(String, Arc<TypeStats>)>,
    /// The last sequence number the feed task registered.
    pub head: u64,
    /// The sequence number the committed checkpoint covers.
    pub committed: u64,
    /// Events registered and not yet acknowledged by every sink.
    pub pending: usize,
    pub lag: Duration,
    /// When the last event was received, if any.
    pub last_event_at: Option<SystemTime>,
}

pub(super) fn snapshot_feeds(state: &AdminState) -> Vec<FeedSnapshot> {
    let now = Instant::now();
    state
        .registry
        .feeds()
        .into_iter()
        .map(|view| {
            let head = view.tracker.head_seq();
            let pending = view.tracker.pending();
            let committed = view.stats.committed_seq.load(Ordering::Relaxed);
            let lag = state.lag.lag(view.lag_input(), head, now);
            let last_ms = view.stats.last_event_at_ms.load(Ordering::Relaxed);
            FeedSnapshot {
                status: view.status.get(),
                types: view.stats.types.snapshot(),
                head,
                committed,
                pending,
                lag,
                last_event_at: (last_ms > 0)
                    .then(|| SystemTime::UNIX_EPOCH + Duration::from_millis(last_ms)),
                view,
            }
        })
        .collect()
}

/// Labels of one sample, in order.
pub(crate) type Labels<'a> = Vec<(&'a str, &'a str)>;

/// Writes one family: its `# HELP`/`# TYPE` lines and one sample per label set. `name` is the
/// exposed name, counters included (`..._total`): the client appends the suffix, so it is
/// taken off here.
fn family<'a, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
    kind: MetricType,
) -> Result<(), std::fmt::Error> {
    let base = match kind {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    };
    let mut metric = enc.encode_descriptor(base, help, None, kind)?;
    for (labels, value) in samples {
        let labels: &[(&str, &str)] = &labels;
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

pub(crate) fn counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> Result<(), std::fmt::Error> {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(enc, name, help, samples, MetricType::Counter)
}

pub(crate) fn gauges<'a, N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, N)>,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let samples = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(enc, name, help, samples, MetricType::Gauge)
}

/// One histogram family; the snapshots' buckets are cumulative, the client wants each
/// bucket's own count.
fn histograms<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels<'a>, HistogramSnapshot)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        let mut below = 0;
        let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(h.buckets.len() + 1);
        for &(bound, cumulative) in &h.buckets {
            buckets.push((bound, cumulative.saturating_sub(below)));
            below = cumulative;
        }
        buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
        let labels: &[(&str, &str)] = &labels;
        metric
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &buckets, None)?;
    }
    Ok(())
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn state_name(s: ReadyState) -> &'static str {
    match s {
        ReadyState::Connecting => "connecting",
        ReadyState::Open => "open",
        ReadyState::Closed => "closed",
        ReadyState::Stopped => "stopped",
    }
}

/// Everything one scrape shows, read once from the registry and the admin endpoint's own
/// counters; encoded by `prometheus-client` as a collector.
pub(super) struct Page {
    feeds: Vec<FeedSnapshot>,
    sinks: Vec<(String, SinkView)>,
    started_at: SystemTime,
    tap_clients: usize,
    tap_skipped: u64,
    serve: Option<Arc<crate::serve::ServeStats>>,
    fleet: Option<Arc<crate::cluster::FleetStats>>,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("feeds", &self.feeds.len())
            .field("sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

impl Page {
    pub(super) fn read(state: &AdminState) -> Page {
        Page {
            feeds: snapshot_feeds(state),
            sinks: state.registry.sinks(),
            started_at: state.registry.started_at,
            tap_clients: state.taps.active.load(Ordering::Relaxed),
            tap_skipped: state.taps.skipped.load(Ordering::Relaxed),
            serve: state.registry.serve_stats(),
            fleet: state.registry.fleet(),
        }
    }
}

/// The fleet's families (`[cluster]`, ARCHITECTURE.md §9), labelled with this instance.
fn fleet_families(
    enc: &mut DescriptorEncoder,
    fleet: &crate::cluster::FleetStats,
) -> Result<(), std::fmt::Error> {
    let labels = || vec![("instance", fleet.instance.as_str())];
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    gauges(
        enc,
        "sse_bridge_cluster_leases_held",
        "Feed leases this instance holds now (the feeds it reads).",
        [(labels(), load(&fleet.held) as i64)],
    )?;
    gauges(
        enc,
        "sse_bridge_cluster_live_instances",
        "Instances of the fleet whose heartbeat had not expired at the last round.",
        [(labels(), load(&fleet.live_instances) as i64)],
    )?;
    counters(
        enc,
        "sse_bridge_cluster_leases_claimed_total",
        "Leases this instance claimed (free, released or expired ones).",
        [(labels(), load(&fleet.claimed))],
    )?;
    counters(
        enc,
        "sse_bridge_cluster_leases_lost_total",
        "Leases this instance lost while holding them (not renewed in time, or taken by another instance); each stopped its feed at once.",
        [(labels(), load(&fleet.lost))],
    )?;
    counters(
        enc,
        "sse_bridge_cluster_leases_handed_over_total",
        "Leases this instance released on purpose after draining the feed (rebalancing, a removed feed, shutdown).",
        [(labels(), load(&fleet.handed_over))],
    )
}

impl Collector for Page {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauges(
            &mut enc,
            "sse_bridge_build_info",
            "Always 1; the version of sse-bridge in a label.",
            [(vec![("version", env!("CARGO_PKG_VERSION"))], 1i64)],
        )?;
        gauges(
            &mut enc,
            "sse_bridge_start_time_seconds",
            "When the process started, in seconds since the Unix epoch.",
            [(vec![], unix_seconds(self.started_at))],
        )?;
        type_families(&mut enc, &self.feeds)?;
        feed_families(&mut enc, &self.feeds)?;
        sink_families(&mut enc, &self.sinks)?;
        gauges(
            &mut enc,
            "sse_bridge_tap_clients",
            "Live /tap connections.",
            [(vec![], self.tap_clients as i64)],
        )?;
        counters(
            &mut enc,
            "sse_bridge_tap_skipped_events_total",
            "Events /tap connections skipped because they read too slowly (the bridge never waits for a tap).",
            [(vec![], self.tap_skipped)],
        )?;
        if let Some(fleet) = &self.fleet {
            fleet_families(&mut enc, fleet)?;
        }
        Ok(())
    }
}

/// Renders the whole page.
pub(super) fn render(state: &AdminState) -> String {
    encode_page(Page::read(state))
}

fn encode_page(page: Page) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    let serve = page.serve.clone();
    registry.register_collector(Box::new(page));
    if let Some(stats) = serve {
        registry.register_collector(Box::new(crate::serve::ServeCollector(stats)));
    }
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail; an encoder error would leave a partial page, which
    // Prometheus rejects as a whole (the scrape fails, visibly), so it is only logged.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!("encoding /metrics failed: {e}");
    }
    out
}

fn type_families(
    enc: &mut DescriptorEncoder,
    feeds: &[FeedSnapshot],
) -> Result<(), std::fmt::Error> {
    type Pick = fn(&TypeStats) -> u64;
    let families: [(&str, &str, Pick); 6] = [
        (
            "sse_bridge_events_received_total",
            "Events received (dispatched by the parser), by feed and event type.",
            |s| s.received.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_event_data_bytes_total",
            "Bytes of event data received, by feed and event type.",
            |s| s.data_bytes.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_events_routed_total",
            "Events handed to at least one sink, by feed and event type.",
            |s| s.routed.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_events_misfit_total",
            "Events sent to the default route because the matched route's sinks cannot store their type.",
            |s| s.misfit.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_events_dropped_total",
            "Events dropped by a drop = true route, by feed and event type.",
            |s| s.dropped.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_events_unrouted_total",
            "Events that matched no route and had no usable default route (counted, not stored).",
            |s| s.unrouted.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, pick) in families {
        let samples = feeds.iter().flat_map(|f| {
            f.types.iter().map(move |(ty, stats)| {
                (
                    vec![("feed", f.view.config.name.as_str()), ("type", ty.as_str())],
                    pick(stats),
                )
            })
        });
        counters(enc, name, help, samples)?;
    }
    Ok(())
}

fn feed_families(
    enc: &mut DescriptorEncoder,
    feeds: &[FeedSnapshot],
) -> Result<(), std::fmt::Error> {
    fn feed(f: &FeedSnapshot) -> &str {
        f.view.config.name.as_str()
    }
    counters(
        enc,
        "sse_bridge_feed_received_bytes_total",
        "Bytes read from the feed's HTTP response bodies.",
        feeds
            .iter()
            .map(|f| (vec![("feed", feed(f))], f.view.status.received_bytes())),
    )?;
    gauges(
        enc,
        "sse_bridge_feed_state",
        "1 for the feed's current state (connecting, open, closed, stopped), 0 for the others.",
        feeds.iter().flat_map(|f| {
            [
                ReadyState::Connecting,
                ReadyState::Open,
                ReadyState::Closed,
                ReadyState::Stopped,
            ]
            .into_iter()
            .map(move |s| {
                (
                    vec![("feed", feed(f)), ("state", state_name(s))],
                    i64::from(f.status.state == s),
                )
            })
        }),
    )?;
    counters(
        enc,
        "sse_bridge_feed_reconnects_total",
        "Connection attempts after the first one.",
        feeds
            .iter()
            .map(|f| (vec![("feed", feed(f))], f.status.reconnects)),
    )?;
    counters(
        enc,
        "sse_bridge_feed_errors_total",
        "Failed connections and broken streams, by class: network, eof, too_large, unavailable (5xx, 408, 429), client (other 4xx, wrong content type, redirects), id_rejected, no_content (204), local (token unreadable).",
        feeds.iter().flat_map(|f| {
            ERROR_CLASSES.iter().map(move |class| {
                (
                    vec![("feed", feed(f)), ("class", *class)],
                    f.status.errors.get(class).copied().unwrap_or(0),
                )
            })
        }),
    )?;
    gauges(
        enc,
        "sse_bridge_feed_backoff_seconds",
        "The delay the feed is waiting out before its next connection attempt (0 when none).",
        feeds.iter().map(|f| {
            (
                vec![("feed", feed(f))],
                f.status.current_backoff.map_or(0.0, |d| d.as_secs_f64()),
            )
        }),
    )?;
    gauges(
        enc,
        "sse_bridge_feed_last_event_timestamp_seconds",
        "When the feed's last event was received, in seconds since the Unix epoch (absent before the first).",
        feeds.iter().filter_map(|f| {
            f.last_event_at
                .map(|t| (vec![("feed", feed(f))], unix_seconds(t)))
        }),
    )?;
    gauges(
        enc,
        "sse_bridge_feed_pending_events",
        "Events received and not yet stored by every sink they were routed to.",
        feeds
            .iter()
            .map(|f| (vec![("feed", feed(f))], f.pending as u64)),
    )?;
    gauges(
        enc,
        "sse_bridge_checkpoint_lag_events",
        "Events received that the committed checkpoint does not cover yet.",
        feeds
            .iter()
            .map(|f| (vec![("feed", feed(f))], f.head.saturating_sub(f.committed))),
    )?;
    gauges(
        enc,
        "sse_bridge_checkpoint_lag_seconds",
        "Age of the oldest received event that the committed checkpoint does not cover yet (0 when it covers everything); up to one second too high.",
        feeds
            .iter()
            .map(|f| (vec![("feed", feed(f))], f.lag.as_secs_f64())),
    )
}

/// A family of sink-kind counters: its help and `(sink, value)` samples.
type OwnFamily<'a> = (&'static str, Vec<(&'a str, u64)>);

fn sink_families(
    enc: &mut DescriptorEncoder,
    sinks: &[(String, SinkView)],
) -> Result<(), std::fmt::Error> {
    gauges(
        enc,
        "sse_bridge_sink_info",
        "Always 1; the sink's type in a label.",
        sinks
            .iter()
            .map(|(name, s)| (vec![("sink", name.as_str()), ("kind", s.kind)], 1i64)),
    )?;
    type Pick = fn(&SinkView) -> u64;
    let families: [(&str, MetricType, &str, Pick); 8] = [
        (
            "sse_bridge_sink_events_stored_total",
            MetricType::Counter,
            "Events the sink stored and acknowledged.",
            |s| s.gauge.health.written.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_sink_events_dropped_total",
            MetricType::Counter,
            "Events dropped because the sink's buffer was full (when_full = \"drop_newest\").",
            |s| s.gauge.health.dropped.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_sink_write_errors_total",
            MetricType::Counter,
            "Failed write attempts (each is retried; nothing is acknowledged until stored).",
            |s| s.gauge.health.errors.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_sink_healthy",
            MetricType::Gauge,
            "1 while the sink's writes succeed, 0 while they are failing.",
            |s| u64::from(s.gauge.health.healthy.load(Ordering::Relaxed)),
        ),
        (
            "sse_bridge_sink_queue_events",
            MetricType::Gauge,
            "Events queued in the sink's buffer and not yet stored.",
            |s| s.gauge.queued() as u64,
        ),
        (
            "sse_bridge_sink_queue_capacity_events",
            MetricType::Gauge,
            "The size of the sink's buffer (buffer.max_events).",
            |s| s.gauge.max_events as u64,
        ),
        (
            "sse_bridge_sink_queue_bytes",
            MetricType::Gauge,
            "Bytes of events queued in the sink's buffer and not yet stored.",
            |s| s.gauge.queued_bytes(),
        ),
        (
            "sse_bridge_sink_queue_capacity_bytes",
            MetricType::Gauge,
            "The byte bound of the sink's buffer (buffer.max_bytes).",
            |s| s.gauge.max_bytes,
        ),
    ];
    for (name, kind, help, pick) in families {
        let samples = sinks
            .iter()
            .map(|(sink, s)| (vec![("sink", sink.as_str())], pick(s)));
        if kind == MetricType::Counter {
            counters(enc, name, help, samples)?;
        } else {
            gauges(enc, name, help, samples)?;
        }
    }
    // The counters of particular kinds of sinks (Kafka), one family per name.
    let mut own: std::collections::BTreeMap<&str, OwnFamily> = Default::default();
    for (sink, s) in sinks {
        let Some(kind_counters) = &s.gauge.health.own else {
            continue;
        };
        for (name, help, value) in kind_counters.counters() {
            own.entry(name)
                .or_insert((help, Vec::new()))
                .1
                .push((sink.as_str(), value));
        }
    }
    for (name, (help, samples)) in own {
        counters(
            enc,
            name,
            help,
            samples
                .into_iter()
                .map(|(sink, v)| (vec![("sink", sink)], v)),
        )?;
    }
    histograms(
        enc,
        "sse_bridge_sink_write_duration_seconds",
        "Time one write (a batch of up to 8192 events, fsync or commit included) took, failed attempts included.",
        sinks.iter().map(|(sink, s)| {
            (
                vec![("sink", sink.as_str())],
                s.gauge.health.write_seconds.snapshot(),
            )
        }),
    )
}

#[cfg(test)]
mod tests {
    use prometheus_parse::{Scrape, Value};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::checkpoint::{FeedTracker, Position};
    use crate::config::FeedConfig;
    use crate::event::Event;
    use crate::route::Outcome;
    use crate::sink::runner;
    use crate::sink::{BufferConfig, Sink, SinkError};
    use crate::telemetry::{FeedStats, TypeCache};

    struct Nowhere;

    impl Sink for Nowhere {
        fn write(&mut self, _events: &[Arc<Event>]) -> Result<(), SinkError> {
            Ok(())
        }
        fn flush(&mut self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    /// A page with one feed (types `edit`, and one whose name needs escaping) and one sink
    /// that took one write of 2 ms.
    fn page() -> (Page, runner::SinkWorker) {
        let view = FeedView {
            config: Arc::new(FeedConfig::new("wiki", "http://127.0.0.1:9/")),
            status: Default::default(),
            tracker: Arc::new(FeedTracker::new(Position {
                seq: 0,
                last_event_id: Arc::from(""),
            })),
            stats: Arc::new(FeedStats::starting_at(0)),
        };
        let mut cache = TypeCache::default();
        cache
            .get(&view.stats.types, "edit")
            .record_many(3, 30, Outcome::Routed, true);
        cache
            .get(&view.stats.types, "we\"ird\\")
            .record_many(1, 5, Outcome::Unrouted, false);
        let (handle, worker) = runner::spawn(
            "archive",
            Box::new(Nowhere),
            &BufferConfig::default(),
            CancellationToken::new(),
            None,
        )
        .expect("runner");
        let gauge = handle.gauge();
        gauge.health.write_seconds.observe(Duration::from_millis(2));
        let feed = FeedSnapshot {
            status: view.status.get(),
            types: view.stats.types.snapshot(),
            head: 4,
            committed: 1,
            pending: 3,
            lag: Duration::from_millis(1500),
            last_event_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            view,
        };
        let page = Page {
            feeds: vec![feed],
            sinks: vec![(
                "archive".to_string(),
                SinkView {
                    kind: "file",
                    gauge,
                },
            )],
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000),
            tap_clients: 2,
            tap_skipped: 7,
            serve: Some(serve_stats()),
            fleet: None,
        };
        (page, worker)
    }

    fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Value {
        let found: Vec<&prometheus_parse::Sample> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value.clone()
    }

    fn serve_stats() -> Arc<crate::serve::ServeStats> {
        let stats = Arc::new(crate::serve::ServeStats::default());
        let wiki = stats.feed("wiki");
        wiki.clients.fetch_add(2, Ordering::Relaxed);
        wiki.connections.fetch_add(5, Ordering::Relaxed);
        wiki.events.fetch_add(40, Ordering::Relaxed);
        stats.refused(crate::serve::stats::Refusal::Unauthenticated);
        stats
    }

    #[tokio::test]
    async fn the_page_parses_with_the_names_types_and_labels_the_readme_lists() {
        let (page, _worker) = page();
        let text = encode_page(page);
        // Every line is a comment, a sample or empty: nothing the parser would skip.
        for line in text.lines() {
            assert_ne!(
                prometheus_parse::LineInfo::parse(line),
                prometheus_parse::LineInfo::Ignored,
                "{line:?}\n{text}"
            );
        }
        assert!(
            text.contains("# TYPE sse_bridge_events_received_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE sse_bridge_sink_write_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE sse_bridge_feed_state gauge\n"));
        // Label values are escaped as the format says.
        assert!(
            text.contains(r#"sse_bridge_events_unrouted_total{feed="wiki",type="we\"ird\\"} 1"#),
            "{text}"
        );
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");
        let edit = [("feed", "wiki"), ("type", "edit")];
        assert_eq!(
            value(&scrape, "sse_bridge_events_received_total", &edit),
            Value::Counter(3.0)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_event_data_bytes_total", &edit),
            Value::Counter(30.0)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_events_routed_total", &edit),
            Value::Counter(3.0)
        );
        assert_eq!(
            value(
                &scrape,
                "sse_bridge_feed_state",
                &[("feed", "wiki"), ("state", "connecting")]
            ),
            Value::Gauge(1.0)
        );
        assert_eq!(
            value(
                &scrape,
                "sse_bridge_feed_errors_total",
                &[("feed", "wiki"), ("class", "network")]
            ),
            Value::Counter(0.0)
        );
        let feed = [("feed", "wiki")];
        for (name, want) in [
            ("sse_bridge_checkpoint_lag_events", 3.0),
            ("sse_bridge_checkpoint_lag_seconds", 1.5),
            ("sse_bridge_feed_pending_events", 3.0),
            ("sse_bridge_feed_backoff_seconds", 0.0),
            ("sse_bridge_feed_last_event_timestamp_seconds", 1.7e9),
        ] {
            assert_eq!(value(&scrape, name, &feed), Value::Gauge(want), "{name}");
        }
        let sink = [("sink", "archive")];
        assert_eq!(
            value(
                &scrape,
                "sse_bridge_sink_info",
                &[("sink", "archive"), ("kind", "file")]
            ),
            Value::Gauge(1.0)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_sink_events_stored_total", &sink),
            Value::Counter(0.0)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_sink_healthy", &sink),
            Value::Gauge(1.0)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_sink_queue_capacity_events", &sink),
            Value::Gauge(10_000.0)
        );
        let Value::Histogram(buckets) =
            value(&scrape, "sse_bridge_sink_write_duration_seconds", &sink)
        else {
            panic!("not a histogram\n{text}");
        };
        let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
        let mut want: Vec<f64> = crate::telemetry::LATENCY_BUCKETS.to_vec();
        want.push(f64::INFINITY);
        assert_eq!(bounds, want);
        let counts: Vec<f64> = buckets.iter().map(|b| b.count).collect();
        assert_eq!(&counts[..4], [0.0, 0.0, 0.0, 0.0], "cumulative, 2 ms");
        assert!(counts[4..].iter().all(|&c| c == 1.0), "{counts:?}");
        assert!(text.contains("sse_bridge_sink_write_duration_seconds_count{sink=\"archive\"} 1\n"));
        assert!(
            text.contains("sse_bridge_sink_write_duration_seconds_sum{sink=\"archive\"} 0.002\n"),
            "{text}"
        );
        assert_eq!(
            value(
                &scrape,
                "sse_bridge_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Value::Gauge(1.0)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_start_time_seconds", &[]),
            Value::Gauge(1.6e9)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_tap_clients", &[]),
            Value::Gauge(2.0)
        );
        // `[serve]`'s counters, when it runs.
        assert_eq!(
            value(&scrape, "sse_bridge_serve_clients", &feed),
            Value::Gauge(2.0)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_serve_connections_total", &feed),
            Value::Counter(5.0)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_serve_events_total", &feed),
            Value::Counter(40.0)
        );
        assert_eq!(
            value(
                &scrape,
                "sse_bridge_serve_refused_total",
                &[("reason", "unauthenticated")]
            ),
            Value::Counter(1.0)
        );
        assert_eq!(
            value(
                &scrape,
                "sse_bridge_serve_refused_total",
                &[("reason", "unknown_feed")]
            ),
            Value::Counter(0.0)
        );
        assert_eq!(
            value(&scrape, "sse_bridge_tap_skipped_events_total", &[]),
            Value::Counter(7.0)
        );
    }
}
