//! The feed task driven by a scripted source: real sink runner threads, a real router built
//! from a configuration, a real state database in a temporary directory.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::*;
use crate::checkpoint::Position;
use crate::config::Config;
use crate::sink::runner::{self, SinkWorker};
use crate::sink::{Sink, SinkError};
use crate::sse::parser::SseEvent;
use crate::state::StateStore;

/// One step of a scripted stream.
enum Step {
    Items(Vec<Item>),
    Gap(crate::sse::client::GapKind, &'static str),
    Stop(&'static str),
}

/// A [`Source`] that plays its steps, then waits forever (an idle stream).
struct Scripted {
    steps: VecDeque<Step>,
    last_event_id: String,
}

impl Source for Scripted {
    fn next(&mut self, out: &mut Vec<Item>) -> impl Future<Output = Next> + Send {
        let step = self.steps.pop_front();
        let gap_id = self.last_event_id.clone();
        if let Some(Step::Gap(crate::sse::client::GapKind::IdRejected, _)) = &step {
            // As the client does: the rejected ID is dropped before the gap is handed out.
            self.last_event_id.clear();
        }
        if let Some(Step::Items(items)) = &step {
            for item in items {
                match item {
                    Item::Event(e) => self.last_event_id = e.id.to_string(),
                    Item::LastEventId(id) => self.last_event_id = id.clone(),
                }
            }
        }
        async move {
            match step {
                Some(Step::Items(items)) => {
                    out.extend(items);
                    Next::Items
                }
                Some(Step::Gap(reason, detail)) => Next::Gap {
                    reason,
                    detail: detail.to_string(),
                    last_event_id: gap_id,
                },
                Some(Step::Stop(reason)) => Next::Stopped {
                    reason: reason.to_string(),
                },
                None => std::future::pending().await,
            }
        }
    }

    fn last_event_id(&self) -> &str {
        &self.last_event_id
    }
}

fn event(event_type: &str, id: &str) -> Item {
    Item::Event(SseEvent {
        event_type: Arc::from(event_type),
        data: format!("{event_type} {id}"),
        id: Arc::from(id),
    })
}

/// A sink that keeps what it stores; its writes wait while `closed` is set.
struct Recording {
    stored: Arc<Mutex<Vec<Arc<Event>>>>,
    closed: Arc<AtomicBool>,
}

impl Sink for Recording {
    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError> {
        while self.closed.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(events.iter().cloned());
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

const CONFIG: &str = r#"
[[feed]]
name = "f"
url = "http://127.0.0.1:9/"

[sink.a]
type = "stdout"

[sink.b]
type = "stdout"

[[route]]
event = "edit"
sinks = ["a", "b"]

[[route]]
event = "log"
sinks = ["b"]

[[route]]
event = "noise"
drop = true
"#;

/// A feed task on a scripted source, with sinks `a` and `b`.
struct Rig {
    _dir: tempfile::TempDir,
    state: SharedState,
    view: FeedView,
    stored: Vec<Arc<Mutex<Vec<Arc<Event>>>>>,
    /// Whether sink `a`'s writes wait.
    a_closed: Arc<AtomicBool>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    _workers: Vec<SinkWorker>,
    _routing: watch::Sender<Arc<Routing>>,
}

impl Rig {
    /// `a_closed`: sink `a`'s writes wait from the start until the test opens it.
    fn start(config: &str, start_seq: u64, steps: Vec<Step>, a_closed: bool) -> Rig {
        let config = Config::from_toml_str(config).expect("config");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(&dir.path().join("state.db")).expect("state");
        let state = SharedState::local(store);
        let configs: Vec<(String, crate::sink::SinkConfig)> = config
            .sink
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        let router = Router::new(&config.route, &config.routing, &configs).expect("router");
        let a_closed = Arc::new(AtomicBool::new(a_closed));
        let (mut sinks, mut stored, mut workers) = (Vec::new(), Vec::new(), Vec::new());
        for (name, c) in &configs {
            let kept = Arc::new(Mutex::new(Vec::new()));
            let closed = if name == "a" {
                a_closed.clone()
            } else {
                Arc::new(AtomicBool::new(false))
            };
            let sink = Recording {
                stored: kept.clone(),
                closed,
            };
            let (handle, worker) = runner::spawn(
                name,
                Box::new(sink),
                c.buffer(),
                CancellationToken::new(),
                None,
            )
            .expect("runner");
            sinks.push(handle);
            stored.push(kept);
            workers.push(worker);
        }
        let feed = Arc::new(config.feed[0].clone());
        let view = FeedView {
            tracker: Arc::new(FeedTracker::for_feed(
                &feed.name,
                &feed.url,
                Position {
                    seq: start_seq,
                    last_event_id: Arc::from("start"),
                },
            )),
            config: feed,
            status: StatusHandle::new(),
            stats: Arc::new(FeedStats::starting_at(start_seq)),
        };
        let (routing, routing_rx) = watch::channel(Arc::new(Routing { router, sinks }));
        let (tap, _) = broadcast::channel(16);
        let source = Scripted {
            steps: steps.into(),
            last_event_id: "start".to_string(),
        };
        let task = FeedTask::new(
            view.clone(),
            source,
            routing_rx,
            state.clone(),
            tap,
            start_seq,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(Box::new(task).run(stop.clone()));
        Rig {
            _dir: dir,
            state,
            view,
            stored,
            a_closed,
            stop,
            task,
            _workers: workers,
            _routing: routing,
        }
    }

    /// `(type, seq)` of what sink `index` (0: `a`, 1: `b`) stored.
    fn stored(&self, index: usize) -> Vec<(String, u64)> {
        self.stored[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|e| (e.event_type.to_string(), e.seq))
            .collect()
    }

    /// Waits (up to 10 s) until the acknowledged position is `seq`.
    async fn acked_at(&self, seq: u64) -> Position {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let p = self.view.tracker.acked();
            if p.seq == seq {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "checkpoint stuck at {p:?}, want {seq}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn stat(&self, counter: impl Fn(&FeedStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        counter(&self.view.stats).load(Ordering::Relaxed)
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the task ends when stopped")
            .expect("no panic");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_to_the_sinks_of_their_route_numbered_from_the_start_position() {
    let rig = Rig::start(
        CONFIG,
        41,
        vec![
            Step::Items(vec![event("edit", "1"), event("log", "2")]),
            Step::Items(vec![
                event("noise", "3"),
                event("other", "4"),
                event("edit", "5"),
            ]),
        ],
        false,
    );
    let p = rig.acked_at(46).await;
    assert_eq!(&*p.last_event_id, "5");
    assert_eq!(
        rig.stored(0),
        [("edit".to_string(), 42), ("edit".to_string(), 46)]
    );
    assert_eq!(
        rig.stored(1),
        [
            ("edit".to_string(), 42),
            ("log".to_string(), 43),
            ("edit".to_string(), 46)
        ]
    );
    assert_eq!(rig.stat(|s| &s.received), 5);
    assert_eq!(rig.stat(|s| &s.routed), 3);
    assert_eq!(rig.stat(|s| &s.dropped), 1, "noise");
    assert_eq!(rig.stat(|s| &s.unrouted), 1, "other");
    assert!(rig.stat(|s| &s.last_event_at_ms) > 0);
    let types = rig.view.stats.types.snapshot();
    let edit = &types.iter().find(|(t, _)| t == "edit").expect("edit").1;
    assert_eq!(edit.received.load(Ordering::Relaxed), 2);
    assert_eq!(rig.view.tracker.head_seq(), 46);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_only_dispatch_moves_the_checkpoint_after_the_events_before_it() {
    let rig = Rig::start(
        CONFIG,
        0,
        vec![
            Step::Items(vec![event("edit", "1"), Item::LastEventId("9".into())]),
            Step::Items(vec![event("other", "9")]),
            Step::Items(vec![Item::LastEventId("10".into())]),
        ],
        false,
    );
    // The unrouted event 2 is acknowledged at once; the ID-only dispatch after event 1 is
    // covered once event 1 is stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = rig.view.tracker.acked();
        if (p.seq, &*p.last_event_id) == (2, "10") {
            break;
        }
        assert!(Instant::now() < deadline, "checkpoint at {p:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(rig.stored(0), [("edit".to_string(), 1)]);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_recorded_with_the_position_it_happened_at() {
    let rig = Rig::start(
        CONFIG,
        7,
        vec![
            Step::Items(vec![event("edit", "a1")]),
            Step::Gap(
                crate::sse::client::GapKind::IdRejected,
                "the server refused a1",
            ),
            Step::Items(vec![event("edit", "b1")]),
        ],
        false,
    );
    rig.acked_at(9).await;
    let SharedState::Local(store) = &rig.state else {
        panic!("a local state database");
    };
    let gaps = store
        .lock()
        .expect("state")
        .list_gaps(Some("f"))
        .expect("gaps");
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let gap = &gaps[0];
    assert_eq!(gap.reason, GapReason::IdRejected);
    assert_eq!(gap.detail, "the server refused a1");
    assert_eq!((gap.last_event_id.as_str(), gap.seq), ("a1", 8));
    assert_eq!(rig.stored(1).last(), Some(&("edit".to_string(), 9)));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_source_parks_the_task_until_it_is_stopped() {
    let rig = Rig::start(
        CONFIG,
        0,
        vec![
            Step::Items(vec![event("edit", "1")]),
            Step::Stop("the server answered 204"),
            Step::Items(vec![event("edit", "never")]),
        ],
        false,
    );
    rig.acked_at(1).await;
    // A window in which nothing may happen: the task neither reads on nor ends.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!rig.task.is_finished(), "the task ended on its own");
    assert_eq!(rig.view.tracker.head_seq(), 1, "read past the stop");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_drop_newest_buffer_counts_the_dropped_events_and_acknowledges_them() {
    let config = CONFIG.replace(
        "[sink.a]\ntype = \"stdout\"\n",
        "[sink.a]\ntype = \"stdout\"\nbuffer = { max_events = 1, when_full = \"drop_newest\" }\n",
    );
    // Sink `a` holds its first batch (its only place) until the test opens it.
    let rig = Rig::start(
        &config,
        0,
        vec![
            Step::Items(vec![event("log", "0")]),
            Step::Items(vec![event("edit", "1")]),
            Step::Items(vec![event("edit", "2"), event("edit", "3")]),
        ],
        true,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.stored(1).len() < 4 {
        assert!(Instant::now() < deadline, "b stored {:?}", rig.stored(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        rig.stat(|s| &s.dropped),
        2,
        "events 3 and 4 did not fit in a"
    );
    assert_eq!(
        rig.view.tracker.acked().seq,
        1,
        "event 2 waits for a's write"
    );
    rig.a_closed.store(false, Ordering::SeqCst);
    let p = rig.acked_at(4).await;
    assert_eq!(
        &*p.last_event_id, "3",
        "dropped events count as acknowledged"
    );
    assert_eq!(rig.stored(0), [("edit".to_string(), 2)]);
    rig.stop().await;
}
