//! `/metrics`: the Prometheus text exposition format (version 0.0.4), written by hand.
//!
//! Every family has `# HELP` and `# TYPE`, its samples are contiguous, label values are escaped
//! (`\\`, `\"`, `\n`), and counters end in `_total`. Feed and sink names are validated names;
//! event types come from the streams, so their number per feed is bounded (see
//! [`super::stats::MAX_TYPES`]).

use std::fmt::{Display, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::server::AdminState;
use super::stats::{HistogramSnapshot, TypeStats};
use crate::sse::status::{FeedStatus, ReadyState, ERROR_CLASSES};
use crate::supervisor::{FeedView, SinkView};

/// The media type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
            let lag = state.lag.lag(&view, head, committed, now);
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

/// Writes families and samples.
struct Out {
    buf: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.buf, "# HELP {name} {help}");
        let _ = writeln!(self.buf, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.buf.push_str(name);
        if !labels.is_empty() {
            self.buf.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.buf.push(',');
                }
                self.buf.push_str(k);
                self.buf.push_str("=\"");
                escape_label(&mut self.buf, v);
                self.buf.push('"');
            }
            self.buf.push('}');
        }
        let _ = writeln!(self.buf, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        let bounds: Vec<String> = h.buckets.iter().map(|(b, _)| b.to_string()).collect();
        let mut with_le: Vec<(&str, &str)> = labels.to_vec();
        for (le, (_, count)) in bounds.iter().zip(&h.buckets) {
            with_le.push(("le", le));
            self.sample(&bucket, &with_le, count);
            with_le.pop();
        }
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, h.count);
        self.sample(&format!("{name}_sum"), labels, F(h.sum_seconds));
        self.sample(&format!("{name}_count"), labels, h.count);
    }
}

/// A float in the exposition format (`+Inf`, `-Inf`, `NaN` spelled as Prometheus does).
struct F(f64);

impl Display for F {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_nan() {
            f.write_str("NaN")
        } else if self.0.is_infinite() {
            f.write_str(if self.0 > 0.0 { "+Inf" } else { "-Inf" })
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
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

/// Renders the whole page.
pub(super) fn render(state: &AdminState) -> String {
    let feeds = snapshot_feeds(state);
    let sinks = state.registry.sinks();
    let mut out = Out {
        buf: String::with_capacity(16 * 1024),
    };

    out.family(
        "sse_bridge_build_info",
        "gauge",
        "Always 1; the version of sse-bridge in a label.",
    );
    out.sample(
        "sse_bridge_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    out.family(
        "sse_bridge_start_time_seconds",
        "gauge",
        "When the process started, in seconds since the Unix epoch.",
    );
    out.sample(
        "sse_bridge_start_time_seconds",
        &[],
        F(unix_seconds(state.registry.started_at)),
    );

    type_families(&mut out, &feeds);
    feed_families(&mut out, &feeds);
    sink_families(&mut out, &sinks);

    out.family("sse_bridge_tap_clients", "gauge", "Live /tap connections.");
    out.sample(
        "sse_bridge_tap_clients",
        &[],
        state.taps.active.load(Ordering::Relaxed),
    );
    out.family(
        "sse_bridge_tap_skipped_events_total",
        "counter",
        "Events /tap connections skipped because they read too slowly (the bridge never waits for a tap).",
    );
    out.sample(
        "sse_bridge_tap_skipped_events_total",
        &[],
        state.taps.skipped.load(Ordering::Relaxed),
    );
    out.buf
}

fn type_families(out: &mut Out, feeds: &[FeedSnapshot]) {
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
        out.family(name, "counter", help);
        for f in feeds {
            for (ty, stats) in &f.types {
                out.sample(
                    name,
                    &[("feed", &f.view.config.name), ("type", ty)],
                    pick(stats),
                );
            }
        }
    }
}

fn feed_families(out: &mut Out, feeds: &[FeedSnapshot]) {
    out.family(
        "sse_bridge_feed_received_bytes_total",
        "counter",
        "Bytes read from the feed's HTTP response bodies.",
    );
    for f in feeds {
        out.sample(
            "sse_bridge_feed_received_bytes_total",
            &[("feed", &f.view.config.name)],
            f.view.status.received_bytes(),
        );
    }
    out.family(
        "sse_bridge_feed_state",
        "gauge",
        "1 for the feed's current state (connecting, open, closed, stopped), 0 for the others.",
    );
    for f in feeds {
        for s in [
            ReadyState::Connecting,
            ReadyState::Open,
            ReadyState::Closed,
            ReadyState::Stopped,
        ] {
            out.sample(
                "sse_bridge_feed_state",
                &[("feed", &f.view.config.name), ("state", state_name(s))],
                u8::from(f.status.state == s),
            );
        }
    }
    out.family(
        "sse_bridge_feed_reconnects_total",
        "counter",
        "Connection attempts after the first one.",
    );
    for f in feeds {
        out.sample(
            "sse_bridge_feed_reconnects_total",
            &[("feed", &f.view.config.name)],
            f.status.reconnects,
        );
    }
    out.family(
        "sse_bridge_feed_errors_total",
        "counter",
        "Failed connections and broken streams, by class: network, eof, too_large, unavailable (5xx, 408, 429), client (other 4xx, wrong content type, redirects), id_rejected, no_content (204), local (token unreadable).",
    );
    for f in feeds {
        for class in ERROR_CLASSES {
            out.sample(
                "sse_bridge_feed_errors_total",
                &[("feed", &f.view.config.name), ("class", class)],
                f.status.errors.get(class).copied().unwrap_or(0),
            );
        }
    }
    out.family(
        "sse_bridge_feed_backoff_seconds",
        "gauge",
        "The delay the feed is waiting out before its next connection attempt (0 when none).",
    );
    for f in feeds {
        out.sample(
            "sse_bridge_feed_backoff_seconds",
            &[("feed", &f.view.config.name)],
            F(f.status.current_backoff.map_or(0.0, |d| d.as_secs_f64())),
        );
    }
    out.family(
        "sse_bridge_feed_last_event_timestamp_seconds",
        "gauge",
        "When the feed's last event was received, in seconds since the Unix epoch (absent before the first).",
    );
    for f in feeds {
        if let Some(t) = f.last_event_at {
            out.sample(
                "sse_bridge_feed_last_event_timestamp_seconds",
                &[("feed", &f.view.config.name)],
                F(unix_seconds(t)),
            );
        }
    }
    out.family(
        "sse_bridge_feed_pending_events",
        "gauge",
        "Events received and not yet stored by every sink they were routed to.",
    );
    for f in feeds {
        out.sample(
            "sse_bridge_feed_pending_events",
            &[("feed", &f.view.config.name)],
            f.pending,
        );
    }
    out.family(
        "sse_bridge_checkpoint_lag_events",
        "gauge",
        "Events received that the committed checkpoint does not cover yet.",
    );
    for f in feeds {
        out.sample(
            "sse_bridge_checkpoint_lag_events",
            &[("feed", &f.view.config.name)],
            f.head.saturating_sub(f.committed),
        );
    }
    out.family(
        "sse_bridge_checkpoint_lag_seconds",
        "gauge",
        "Age of the oldest received event that the committed checkpoint does not cover yet (0 when it covers everything); up to one second too high.",
    );
    for f in feeds {
        out.sample(
            "sse_bridge_checkpoint_lag_seconds",
            &[("feed", &f.view.config.name)],
            F(f.lag.as_secs_f64()),
        );
    }
}

/// A family of sink-kind counters: its help and `(sink, value)` samples.
type OwnFamily<'a> = (&'static str, Vec<(&'a str, u64)>);

fn sink_families(out: &mut Out, sinks: &[(String, SinkView)]) {
    out.family(
        "sse_bridge_sink_info",
        "gauge",
        "Always 1; the sink's type in a label.",
    );
    for (name, s) in sinks {
        out.sample(
            "sse_bridge_sink_info",
            &[("sink", name), ("kind", s.kind)],
            1,
        );
    }
    type Pick = fn(&SinkView) -> u64;
    let families: [(&str, &str, &str, Pick); 8] = [
        (
            "sse_bridge_sink_events_stored_total",
            "counter",
            "Events the sink stored and acknowledged.",
            |s| s.gauge.health.written.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_sink_events_dropped_total",
            "counter",
            "Events dropped because the sink's buffer was full (when_full = \"drop_newest\").",
            |s| s.gauge.health.dropped.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_sink_write_errors_total",
            "counter",
            "Failed write attempts (each is retried; nothing is acknowledged until stored).",
            |s| s.gauge.health.errors.load(Ordering::Relaxed),
        ),
        (
            "sse_bridge_sink_healthy",
            "gauge",
            "1 while the sink's writes succeed, 0 while they are failing.",
            |s| u64::from(s.gauge.health.healthy.load(Ordering::Relaxed)),
        ),
        (
            "sse_bridge_sink_queue_events",
            "gauge",
            "Events queued in the sink's buffer and not yet stored.",
            |s| s.gauge.queued() as u64,
        ),
        (
            "sse_bridge_sink_queue_capacity_events",
            "gauge",
            "The size of the sink's buffer (buffer.max_events).",
            |s| s.gauge.max_events as u64,
        ),
        (
            "sse_bridge_sink_queue_bytes",
            "gauge",
            "Bytes of events queued in the sink's buffer and not yet stored.",
            |s| s.gauge.queued_bytes(),
        ),
        (
            "sse_bridge_sink_queue_capacity_bytes",
            "gauge",
            "The byte bound of the sink's buffer (buffer.max_bytes).",
            |s| s.gauge.max_bytes,
        ),
    ];
    for (name, kind, help, pick) in families {
        out.family(name, kind, help);
        for (sink, s) in sinks {
            out.sample(name, &[("sink", sink)], pick(s));
        }
    }
    // The counters of particular kinds of sinks (Kafka), one family per name.
    let mut own: std::collections::BTreeMap<&str, OwnFamily> = Default::default();
    for (sink, s) in sinks {
        let Some(counters) = &s.gauge.health.own else {
            continue;
        };
        for (name, help, value) in counters.counters() {
            own.entry(name)
                .or_insert((help, Vec::new()))
                .1
                .push((sink.as_str(), value));
        }
    }
    for (name, (help, samples)) in own {
        out.family(name, "counter", help);
        for (sink, value) in samples {
            out.sample(name, &[("sink", sink)], value);
        }
    }
    out.family(
        "sse_bridge_sink_write_duration_seconds",
        "histogram",
        "Time one write (a batch of up to 8192 events, fsync or commit included) took, failed attempts included.",
    );
    for (sink, s) in sinks {
        out.histogram(
            "sse_bridge_sink_write_duration_seconds",
            &[("sink", sink)],
            &s.gauge.health.write_seconds.snapshot(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut s = String::new();
        escape_label(&mut s, "a\\b\"c\nd é");
        assert_eq!(s, "a\\\\b\\\"c\\nd é");
    }

    #[test]
    fn samples_and_histograms_are_well_formed() {
        let mut out = Out { buf: String::new() };
        out.family("x_total", "counter", "help");
        out.sample("x_total", &[("feed", "f"), ("type", "a\"b")], 3);
        let h = super::super::stats::Histogram::default();
        h.observe(Duration::from_millis(2));
        out.histogram("lat_seconds", &[("sink", "s")], &h.snapshot());
        let text = out.buf;
        assert!(text.contains("# TYPE x_total counter\n"));
        assert!(text.contains("x_total{feed=\"f\",type=\"a\\\"b\"} 3\n"));
        assert!(text.contains("lat_seconds_bucket{sink=\"s\",le=\"0.001\"} 0\n"));
        assert!(text.contains("lat_seconds_bucket{sink=\"s\",le=\"0.0025\"} 1\n"));
        assert!(text.contains("lat_seconds_bucket{sink=\"s\",le=\"+Inf\"} 1\n"));
        assert!(text.contains("lat_seconds_count{sink=\"s\"} 1\n"));
        assert!(text.contains("lat_seconds_sum{sink=\"s\"} 0.002\n"));
    }

    #[test]
    fn floats_use_prometheus_spelling() {
        assert_eq!(F(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(F(f64::NAN).to_string(), "NaN");
        assert_eq!(F(1.0).to_string(), "1");
        assert_eq!(F(0.25).to_string(), "0.25");
    }
}
