//! `type = "postgres"`: events as rows of a PostgreSQL table, stored exactly once.
//!
//! Each batch is one transaction: the feeds' cursors are read (`sse_bridge_cursors`), the
//! re-fetched copies of stored events are left out (ARCHITECTURE.md §4), the rest goes in
//! with one binary `COPY`, and each feed's cursor moves to its last event, all committed
//! together. A batch that fails (a lost connection, a restarted server, a missing
//! permission) is rolled back whole and retried by the runner with backoff while the feeds
//! are held back; a commit whose answer was lost is found by the retry in the cursor, so
//! nothing is stored twice.
//!
//! The driver (`tokio-postgres`) is asynchronous and the sink interface is not: the
//! connection lives on a thread of its own with a small runtime, and `write` hands it a batch
//! and waits for the answer, as a blocking database call would.

pub mod config;
pub(crate) mod schema;

#[cfg(test)]
mod tests;

pub use config::PostgresSinkConfig;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::{DuplicateCounter, SinkError, WriteOptions};
use crate::event::Event;

/// The channel a commit notifies, with the table as payload (`LISTEN sse_bridge_events`).
pub const NOTIFY_CHANNEL: &str = "sse_bridge_events";

/// The column types of the binary `COPY` (feed, seq, id, type, data, data_json, received_at),
/// in the order of `migrations/postgres/0001_events.sql`.
pub const COPY_TYPES: [Type; 7] = [
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::TIMESTAMPTZ,
];

/// A batch may take this long (connecting, the copy, the commit) before the connection is
/// dropped and the batch retried.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// A feed's run as the runner announced it.
#[derive(Debug, Clone)]
struct Run {
    url: String,
    /// The event the run resumes after (0 and "": from the beginning).
    start_seq: u64,
    start_id: String,
    /// A run from the beginning is judged by its first event instead (see
    /// `PostgresSink::resolve_first_events`): `None` until it is seen.
    first: Option<Arc<Event>>,
    /// In a fleet: the lease epoch the run reads under.
    epoch: Option<i64>,
}

/// What a stored batch left out.
#[derive(Debug, Default)]
struct Report {
    skipped: u64,
    /// Feeds whose stored event at the cursor had another id than the re-fetched one:
    /// (feed, cursor seq, stored id, re-fetched id).
    mismatches: Vec<(String, u64, String, String)>,
    /// Feeds whose events were refused because this instance no longer holds their lease
    /// (a fleet, ARCHITECTURE.md §9), with how many events.
    /// (feed, epoch, events)
    fenced: Vec<(String, i64, u64)>,
}

/// In a fleet: the instance and the lease epochs (feed, epoch) a batch is written under.
struct Fencing {
    instance: String,
    leases: Vec<(String, i64)>,
}

struct Request {
    events: Vec<Arc<Event>>,
    fencing: Option<Fencing>,
    runs: HashMap<Arc<str>, Run>,
    reply: mpsc::Sender<Result<Report, String>>,
}

/// A built PostgreSQL sink.
pub struct PostgresSink {
    name: String,
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
    runs: HashMap<Arc<str>, Run>,
    /// Runs from the beginning whose first event is not seen yet.
    first_pending: std::collections::HashSet<Arc<str>>,
    state_path: Option<PathBuf>,
    duplicates: Arc<DuplicateCounter>,
    options: WriteOptions,
    /// In a fleet: the leases this instance holds, checked in every transaction.
    fence: Option<Arc<crate::cluster::fence::Fence>>,
}

impl PostgresSink {
    /// Checks the settings and reads the connection string; connecting happens on the first
    /// write (and again after any failure), so a database that is down holds the feeds back
    /// instead of failing the start.
    pub fn build(
        name: &str,
        c: &PostgresSinkConfig,
        state_path: Option<&Path>,
    ) -> Result<Self, SinkError> {
        Self::build_fenced(name, c, state_path, None)
    }

    /// [`PostgresSink::build`] for an instance of a fleet: every batch checks, in its
    /// transaction, that this instance still holds the lease of each feed in it, with the
    /// epoch the feed runs under; the events of a feed whose lease is gone are refused and
    /// the coordinator told (ARCHITECTURE.md §9). The table must be in the fleet's database,
    /// and the session ends a transaction its client stopped in the middle of (a frozen
    /// instance), so the lease rows it holds are free again within half a lease.
    pub fn build_fenced(
        name: &str,
        c: &PostgresSinkConfig,
        state_path: Option<&Path>,
        fence: Option<Arc<crate::cluster::fence::Fence>>,
    ) -> Result<Self, SinkError> {
        let config_error = |message: String| SinkError::Config {
            sink: name.to_string(),
            message,
        };
        if let Some((key, message)) = c.validate().into_iter().next() {
            return Err(config_error(format!("{key}: {message}")));
        }
        let mut connection = c.connection().map_err(config_error)?;
        if let Some(fence) = &fence {
            if !crate::cluster::same_database(fence.database(), &connection) {
                return Err(config_error(format!(
                    "url: in a fleet, a postgres sink must write to the fleet's database ({}), \
                     not {}: each batch checks the feed's lease in the same transaction",
                    config::shown(fence.database()),
                    config::shown(&connection)
                )));
            }
            crate::cluster::bound_sessions(&mut connection, fence.lease_ttl());
            connection.application_name(crate::cluster::application_name(fence.instance()));
        }
        let tls = tls_connector(c.ca_file.as_deref()).map_err(config_error)?;
        let worker = Worker {
            sink: name.to_string(),
            shown: config::shown(&connection),
            connection,
            tls,
            table: c.table.clone(),
            cursors: schema::cursors_table(&c.table),
            data_json: c.data_json,
            conn: None,
        };
        let (requests, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name(format!("sink-{name}-pg"))
            .spawn(move || worker.run(rx))
            .map_err(|e| SinkError::Io {
                sink: name.to_string(),
                context: "cannot start the PostgreSQL connection thread".into(),
                source: e,
            })?;
        Ok(PostgresSink {
            name: name.to_string(),
            requests: Some(requests),
            thread: Some(thread),
            runs: HashMap::new(),
            first_pending: Default::default(),
            state_path: state_path.map(Path::to_path_buf),
            duplicates: Arc::default(),
            options: WriteOptions {
                max_batch_events: c.batch_max_events.clamp(1, config::MAX_BATCH_EVENTS),
                max_batch_wait: c.batch_max_wait,
                checkpoints: false,
            },
            fence,
        })
    }

    fn db_error(&self, message: String) -> SinkError {
        SinkError::Db {
            sink: self.name.clone(),
            message,
        }
    }
}

/// The TLS connector of every PostgreSQL client (this sink, `replay`, `serve`): the web roots,
/// or those plus `ca_file`; no ALPN (PostgreSQL negotiates TLS inside its own protocol).
pub fn tls_connector(
    ca_file: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let shared = match ca_file {
        Some(path) => crate::sse::transport::tls::tls_config_with_ca_file(path),
        None => crate::sse::transport::tls::shared_config(),
    }
    .map_err(|e| format!("ca_file: {e}"))?;
    let mut config = (*shared).clone();
    config.alpn_protocols.clear();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PostgresSink {
    /// A run that started from the beginning (no checkpoint: a crash before the first
    /// commit, or a reset) has no event to resume after; its first event takes that place.
    /// When the table holds that very event (seq, id, type and data) before its cursor, the
    /// server is sending the stream the table holds again, and the copies are dropped as
    /// after a checkpoint (ARCHITECTURE.md §4).
    fn resolve_first_events(&mut self, events: &[Arc<Event>]) {
        if self.first_pending.is_empty() {
            return;
        }
        for event in events {
            if !self.first_pending.remove(&event.feed) {
                continue;
            }
            let Some(run) = self.runs.get_mut(&event.feed) else {
                continue;
            };
            run.first = Some(event.clone());
            if !event.id.is_empty() {
                run.start_seq = event.seq;
                run.start_id = event.id.to_string();
            }
        }
    }
}

impl Drop for PostgresSink {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl super::Sink for PostgresSink {
    fn write(&mut self, events: &[Arc<Event>]) -> Result<(), SinkError> {
        self.resolve_first_events(events);
        let (reply, answer) = mpsc::channel();
        let fencing = self.fence.as_ref().map(|fence| {
            let mut leases: Vec<(String, i64)> = Vec::new();
            for e in events {
                if !leases.iter().any(|(f, _)| **f == *e.feed) {
                    // The epoch of the run that sent the events, not the one the feed may
                    // hold now; a run without one is named with -1, which no lease row has.
                    let epoch = self.runs.get(&*e.feed).and_then(|r| r.epoch);
                    leases.push((e.feed.to_string(), epoch.unwrap_or(-1)));
                }
            }
            Fencing {
                instance: fence.instance().to_string(),
                leases,
            }
        });
        let request = Request {
            events: events.to_vec(),
            fencing,
            runs: self.runs.clone(),
            reply,
        };
        let sent = self
            .requests
            .as_ref()
            .is_some_and(|r| r.send(request).is_ok());
        if !sent {
            return Err(self.db_error("the PostgreSQL connection thread has ended".into()));
        }
        let report = answer
            .recv()
            .map_err(|_| self.db_error("the PostgreSQL connection thread has ended".into()))?
            .map_err(|m| self.db_error(m))?;
        self.duplicates.add(report.skipped);
        for (feed, epoch, events) in &report.fenced {
            tracing::warn!(sink = %self.name, feed = %feed, epoch, events, "this instance lost the feed's lease: the sink refused its events (the new holder stores them)");
            if let Some(fence) = &self.fence {
                fence.report_lost(feed, *epoch);
            }
        }
        for (feed, seq, stored, found) in report.mismatches {
            let url = self.runs.get(feed.as_str()).map(|r| r.url.clone());
            super::record_replay_mismatch(
                &self.name,
                self.state_path.as_deref(),
                &feed,
                url.as_deref().unwrap_or(""),
                seq,
                &stored,
                &found,
                "the table holds",
            );
        }
        Ok(())
    }

    fn options(&self) -> WriteOptions {
        self.options
    }

    fn feed_started(&mut self, feed: &str, url: &str, start_seq: u64, start_id: &str) {
        if start_seq == 0 {
            self.first_pending.insert(Arc::from(feed));
        } else {
            self.first_pending.remove(feed);
        }
        self.runs.insert(
            Arc::from(feed),
            Run {
                url: url.to_string(),
                start_seq,
                start_id: start_id.to_string(),
                first: None,
                epoch: None,
            },
        );
    }

    fn feed_epoch(&mut self, feed: &str, epoch: Option<i64>) {
        if let Some(run) = self.runs.get_mut(feed) {
            run.epoch = epoch;
        }
    }

    fn counters(&self) -> Option<Arc<dyn super::SinkCounters>> {
        Some(self.duplicates.clone())
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        // Every batch is committed before it is acknowledged.
        Ok(())
    }
}

/// The connection thread's state.
struct Worker {
    sink: String,
    shown: String,
    connection: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    table: String,
    cursors: String,
    data_json: bool,
    conn: Option<Conn>,
}

/// An open connection with its statements.
struct Conn {
    client: tokio_postgres::Client,
    lock: tokio_postgres::Statement,
    anchor: tokio_postgres::Statement,
    read_cursor: tokio_postgres::Statement,
    write_cursor: tokio_postgres::Statement,
    copy: String,
}

/// `data` as `jsonb` (its binary form: a version byte, then the JSON text), for data that
/// parses as JSON.
#[derive(Debug)]
struct RawJson<'a>(&'a str);

impl ToSql for RawJson<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    tokio_postgres::types::to_sql_checked!();
}

/// `text` as PostgreSQL can store it: a `text` value cannot hold NUL, which a stream may send;
/// it is stored as U+FFFD (README, "The PostgreSQL sink").
pub(crate) fn pg_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// What an error says, with the server's message, code and detail when there is one.
pub(crate) fn describe(context: &str, e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!(
                "{context}: {} (SQLSTATE {})",
                db.message(),
                db.code().code()
            );
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => format!("{context}: {e}"),
    }
}

impl Worker {
    fn run(mut self, requests: mpsc::Receiver<Request>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(sink = %self.sink, "cannot start the PostgreSQL runtime: {e}");
                return;
            }
        };
        while let Ok(request) = requests.recv() {
            let result = runtime.block_on(async {
                match tokio::time::timeout(WRITE_TIMEOUT, self.store(&request)).await {
                    Ok(result) => result,
                    Err(_) => {
                        self.conn = None;
                        Err(format!(
                            "{}: no answer within {}s; reconnecting",
                            self.shown,
                            WRITE_TIMEOUT.as_secs()
                        ))
                    }
                }
            });
            let _ = request.reply.send(result);
        }
    }

    async fn connect(&mut self) -> Result<Conn, String> {
        let tls = self.tls.clone();
        let (mut client, connection) = self
            .connection
            .connect(tls)
            .await
            .map_err(|e| describe(&format!("cannot connect to {}", self.shown), &e))?;
        let sink = self.sink.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(sink = %sink, "PostgreSQL connection ended: {e}");
            }
        });
        schema::migrate(&mut client, &self.table)
            .await
            .map_err(|e| describe(&format!("cannot prepare table {}", self.table), &e))?;
        let read_cursor = client
            .prepare(&format!(
                "SELECT seq, id FROM {} WHERE target = $1 AND feed = $2",
                self.cursors
            ))
            .await
            .map_err(|e| describe("cannot prepare the cursor query", &e))?;
        let write_cursor = client
            .prepare(&format!(
                "INSERT INTO {} (target, feed, seq, id, updated_at) VALUES ($1, $2, $3, $4, now()) \
                 ON CONFLICT (target, feed) DO UPDATE SET seq = excluded.seq, id = excluded.id, \
                 updated_at = excluded.updated_at",
                self.cursors
            ))
            .await
            .map_err(|e| describe("cannot prepare the cursor update", &e))?;
        let lock = client
            .prepare("SELECT pg_advisory_xact_lock(hashtext('sse-bridge writes ' || $1::text))")
            .await
            .map_err(|e| describe("cannot prepare the table lock", &e))?;
        let anchor = client
            .prepare(&format!(
                "SELECT (SELECT max(pos) FROM {t} WHERE feed = $1 AND seq = $2 AND id = $3 \
                                AND ($6::text IS NULL OR (type = $6 AND data = $7))), \
                        (SELECT max(pos) FROM {t} WHERE feed = $1 AND seq = $4 AND id = $5)",
                t = self.table
            ))
            .await
            .map_err(|e| describe("cannot prepare the resume check", &e))?;
        tracing::info!(sink = %self.sink, database = %self.shown, table = %self.table, "connected to PostgreSQL");
        Ok(Conn {
            client,
            lock,
            anchor,
            read_cursor,
            write_cursor,
            copy: format!(
                "COPY {} (feed, seq, id, type, data, data_json, received_at) FROM STDIN (FORMAT binary)",
                self.table
            ),
        })
    }

    async fn store(&mut self, request: &Request) -> Result<Report, String> {
        if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            self.conn = Some(self.connect().await?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err("not connected".into());
        };
        let result = store_batch(conn, &self.table, self.data_json, request).await;
        if let Err(e) = &result {
            // A broken connection is opened again for the retry; a refusal by the server
            // (permissions, a bad table) keeps it.
            if e.is_closed() || e.as_db_error().is_none() {
                self.conn = None;
            }
        }
        result.map_err(|e| describe(&format!("cannot store a batch in {}", self.table), &e))
    }
}

async fn store_batch(
    conn: &mut Conn,
    table: &str,
    data_json: bool,
    request: &Request,
) -> Result<Report, tokio_postgres::Error> {
    let mut report = Report::default();
    let tx = conn.client.transaction().await?;
    // One writer per table at a time: a retry waits for an earlier attempt still committing
    // (its answer lost) instead of reading a cursor that is about to move, and rows commit
    // in `pos` order, as readers that tail by `pos` need.
    tx.execute(&conn.lock, &[&table]).await?;
    // In a fleet, the leases of the batch's feeds, held for the transaction (`FOR KEY SHARE`:
    // a claim by another instance, `FOR UPDATE`, cannot take them until it ends; renewals
    // change no key and go on); the events of a feed whose lease is gone are left out
    // (ARCHITECTURE.md §9).
    let mut refused: Vec<&str> = Vec::new();
    if let Some(fencing) = &request.fencing {
        let feeds: Vec<&str> = fencing.leases.iter().map(|(f, _)| f.as_str()).collect();
        let epochs: Vec<i64> = fencing.leases.iter().map(|(_, e)| *e).collect();
        let holding: Vec<String> = tx
            .query(
                crate::cluster::fence::HOLDING_SQL,
                &[&feeds, &epochs, &fencing.instance],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (feed, epoch) in &fencing.leases {
            if !holding.iter().any(|h| h == feed) {
                refused.push(feed);
                let n = request.events.iter().filter(|e| *e.feed == **feed).count() as u64;
                report.fenced.push((feed.to_string(), *epoch, n));
            }
        }
    }
    let events: Vec<&Arc<Event>> = request
        .events
        .iter()
        .filter(|e| !refused.contains(&&*e.feed))
        .collect();
    // Per feed, the cursor below which the batch's events are already stored, when that is
    // sure: the batch holds the very event at the cursor (a retry after a lost commit
    // answer, or a re-fetch), or the feed resumed after an event the table holds before the
    // cursor (the same numbering continued).
    let mut floors: HashMap<&str, (i64, String)> = HashMap::new();
    for event in &events {
        let feed: &str = &event.feed;
        if floors.contains_key(feed) {
            continue;
        }
        let none = (-1, String::new());
        let Some(row) = tx.query_opt(&conn.read_cursor, &[&table, &feed]).await? else {
            floors.insert(feed, none);
            continue;
        };
        let cursor: (i64, String) = (row.get(0), row.get(1));
        let same_feed = events.iter().filter(|e| &*e.feed == feed);
        let holds_cursor = same_feed.clone().any(|e| {
            i64::try_from(e.seq).ok() == Some(cursor.0) && pg_text(&e.id) == cursor.1.as_str()
        });
        let reaches = same_feed
            .clone()
            .any(|e| i64::try_from(e.seq).is_ok_and(|s| s <= cursor.0));
        let continued = match request.runs.get(feed) {
            Some(run)
                if reaches && !holds_cursor && run.start_seq > 0 && !run.start_id.is_empty() =>
            {
                let start = i64::try_from(run.start_seq).unwrap_or(i64::MAX);
                // A run from the beginning: its first event must be the very one stored.
                let first = run.first.as_ref().filter(|e| e.seq == run.start_seq);
                let first_type = first.map(|e| pg_text(&e.event_type));
                let first_data = first.map(|e| pg_text(&e.data));
                let order = tx
                    .query_one(
                        &conn.anchor,
                        &[
                            &feed,
                            &start,
                            &pg_text(&run.start_id).as_ref(),
                            &cursor.0,
                            &cursor.1,
                            &first_type.as_deref(),
                            &first_data.as_deref(),
                        ],
                    )
                    .await?;
                let anchor: Option<i64> = order.get(0);
                let at_cursor: Option<i64> = order.get(1);
                matches!((anchor, at_cursor), (Some(a), Some(c)) if a < c)
            }
            _ => false,
        };
        floors.insert(
            feed,
            if holds_cursor || continued {
                cursor
            } else {
                none
            },
        );
    }
    let mut kept: Vec<&Event> = Vec::with_capacity(events.len());
    let mut checked: Vec<&str> = Vec::new();
    for event in &events {
        let seq = i64::try_from(event.seq).unwrap_or(i64::MAX);
        let feed: &str = &event.feed;
        let (floor, stored_id) = floors
            .get(feed)
            .map_or((-1, ""), |(s, id)| (*s, id.as_str()));
        if seq < floor {
            report.skipped += 1;
        } else if seq == floor && !checked.contains(&feed) {
            checked.push(feed);
            if pg_text(&event.id) == stored_id {
                report.skipped += 1;
            } else {
                report.mismatches.push((
                    feed.to_string(),
                    event.seq,
                    stored_id.to_string(),
                    event.id.to_string(),
                ));
                kept.push(event);
            }
        } else {
            kept.push(event);
        }
    }
    if !kept.is_empty() {
        let sink = tx.copy_in(&conn.copy).await?;
        let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
        futures_util::pin_mut!(writer);
        for e in &kept {
            let seq = i64::try_from(e.seq).unwrap_or(i64::MAX);
            // jsonb refuses a NUL character even escaped; such data stays text only.
            let json = (data_json
                && !e.data.contains('\0')
                && !e.data.contains("\\u0000")
                && serde_json::from_str::<serde::de::IgnoredAny>(&e.data).is_ok())
            .then_some(RawJson(&e.data));
            let (feed, id, event_type, data) = (
                pg_text(&e.feed),
                pg_text(&e.id),
                pg_text(&e.event_type),
                pg_text(&e.data),
            );
            writer
                .as_mut()
                .write(&[
                    &feed.as_ref(),
                    &seq,
                    &id.as_ref(),
                    &event_type.as_ref(),
                    &data.as_ref(),
                    &json,
                    &e.received_at,
                ])
                .await?;
        }
        writer.finish().await?;
        // Each feed's cursor: its last event in this batch.
        let mut last: Vec<&Event> = Vec::new();
        for e in kept.iter().rev() {
            if !last.iter().any(|l| l.feed == e.feed) {
                last.push(e);
            }
        }
        for e in last {
            let seq = i64::try_from(e.seq).unwrap_or(i64::MAX);
            tx.execute(
                &conn.write_cursor,
                &[
                    &table,
                    &pg_text(&e.feed).as_ref(),
                    &seq,
                    &pg_text(&e.id).as_ref(),
                ],
            )
            .await?;
        }
        // Readers that follow the table (`replay --follow`) are woken at the commit.
        tx.execute("SELECT pg_notify($1, $2)", &[&NOTIFY_CHANNEL, &table])
            .await?;
    }
    tx.commit().await?;
    Ok(report)
}
