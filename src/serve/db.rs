//! The event database side of `serve`: reading pages of stored events, rendered as SSE
//! frames, through a small pool of read-only connections; and the poller that publishes new
//! events to every live client once.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::Connection;
use tokio::sync::Semaphore;

use super::Shared;
use crate::sse::encode::encode_sse;
use crate::store::sqlite::{self as store, open_read_only as open_event_db};

/// Rows per database page.
pub(super) const PAGE: usize = 500;

/// A page read from the database stops once it holds this many bytes of rendered frames (and
/// always holds at least one row): what a client catching up holds besides its queue.
pub const PAGE_BYTES: usize = 64 * 1024;

/// A client's first page is small: its first event should not wait behind a large read.
pub(super) const FIRST_PAGE_BYTES: usize = 8 * 1024;

/// The poller's pages may be larger: it reads once for every client.
pub(super) const POLL_PAGE_BYTES: usize = 1024 * 1024;

/// Read-only database connections shared by all clients (each holds up to three descriptors,
/// the database and its `-wal` and `-shm`, and a page cache).
pub const POOL: usize = 4;

/// One stored event, rendered once for every client.
#[derive(Debug)]
pub(super) struct Frame {
    pub(super) pos: i64,
    pub(super) feed: Arc<str>,
    pub(super) event_type: String,
    pub(super) bytes: Bytes,
    /// Bytes published to the ring up to and including this frame: how far behind a client
    /// is, in bytes, is `published - end` of the last frame it took.
    pub(super) end: u64,
}

/// A row read from the database, rendered.
pub(super) struct Row {
    pub(super) pos: i64,
    pub(super) feed: String,
    pub(super) event_type: String,
    pub(super) bytes: Bytes,
}

/// The `id:` a stored event is served with: its own id, or `@POS` when it has none.
pub fn served_id(pos: i64, id: &str) -> String {
    if id.is_empty() {
        format!("@{pos}")
    } else {
        id.to_string()
    }
}

pub(super) fn render(pos: i64, id: &str, event_type: &str, data: &str) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + id.len() + event_type.len() + 32);
    encode_sse(Some(&served_id(pos, id)), event_type, data, &mut out);
    Bytes::from(out)
}

/// Why the event database could not be read for a client or the poller.
#[derive(Debug, thiserror::Error)]
pub(super) enum DbError {
    #[error(transparent)]
    Open(#[from] store::OpenError),
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Row(#[from] store::RowError),
    #[error("the database pool is closed")]
    Closed,
    #[error("a database read failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Pg(String),
    #[error("the events table does not exist yet")]
    NoTable,
}

/// Where `serve` reads stored events: a `sqlite` sink's database, or a `postgres` sink's table.
#[derive(Debug, Clone)]
pub enum EventSource {
    Sqlite(PathBuf),
    Postgres {
        /// Boxed: the driver's settings are large, and sources are few.
        connection: Box<tokio_postgres::Config>,
        table: String,
    },
}

impl EventSource {
    /// What log lines call it (never a password).
    pub fn shown(&self) -> String {
        match self {
            EventSource::Sqlite(path) => path.display().to_string(),
            EventSource::Postgres { connection, table } => format!(
                "{} table {table}",
                crate::sink::postgres::config::shown(connection)
            ),
        }
    }
}

/// The store the handlers, the clients and the poller read.
pub(super) enum Store {
    Sqlite(Arc<Pool>),
    Postgres(Arc<super::pg::PgPool>),
}

impl Store {
    pub(super) fn open(source: &EventSource) -> Result<Store, String> {
        Ok(match source {
            EventSource::Sqlite(path) => Store::Sqlite(Arc::new(Pool::new(path.clone()))),
            EventSource::Postgres { connection, table } => Store::Postgres(Arc::new(
                super::pg::PgPool::new((**connection).clone(), table.clone())?,
            )),
        })
    }

    /// A page of `feed` (or of every feed) after `after`; `first`: a client's first read.
    pub(super) async fn page(
        &self,
        first: bool,
        feed: Option<Arc<str>>,
        after: i64,
        max_bytes: usize,
    ) -> Result<Vec<Row>, DbError> {
        match self {
            Store::Sqlite(pool) => {
                pool.with(first, move |c| {
                    read_rows(c, feed.as_deref(), after, max_bytes)
                })
                .await
            }
            Store::Postgres(pool) => pool.page(first, feed.as_deref(), after, max_bytes).await,
        }
    }

    /// Whether `feed` is known (configured, or stored) and where a resume after `resume`
    /// continues.
    pub(super) async fn lookup(
        &self,
        feed: String,
        configured: bool,
        resume: Option<String>,
    ) -> Result<(bool, Option<i64>), DbError> {
        match self {
            Store::Sqlite(pool) => {
                pool.with(true, move |conn| {
                    let known = configured || feed_has_events(conn, &feed)?;
                    let pos = match (&resume, known) {
                        (Some(id), true) => resume_pos(conn, &feed, id)?,
                        _ => None,
                    };
                    Ok((known, pos))
                })
                .await
            }
            Store::Postgres(pool) => pool.lookup(&feed, configured, resume.as_deref()).await,
        }
    }

    /// Where the log ends now.
    pub(super) async fn last_pos(&self) -> Result<i64, DbError> {
        match self {
            Store::Sqlite(pool) => pool.with(true, |c| Ok(store::last_pos(c)?)).await,
            Store::Postgres(pool) => pool.last_pos().await,
        }
    }
}

/// The poller's step: publishes a page read after `last` and moves `last` past it; whether
/// the page was full (more may be waiting to be read at once).
pub(super) fn publish_page(shared: &Shared, page: Vec<Row>, last: &mut i64) -> bool {
    let full =
        page.len() >= PAGE || page.iter().map(|r| r.bytes.len()).sum::<usize>() >= POLL_PAGE_BYTES;
    if let Some(l) = publish(shared, page) {
        *last = l;
    }
    full
}

/// Publishes rows to every live client, in order; the last `pos` published.
fn publish(shared: &Shared, page: Vec<Row>) -> Option<i64> {
    let mut last = None;
    for row in page {
        last = Some(row.pos);
        let len = row.bytes.len() as u64;
        let end = shared.published.fetch_add(len, Ordering::AcqRel) + len;
        // No receiver is fine: nobody is live right now.
        let _ = shared.live.send(Arc::new(Frame {
            pos: row.pos,
            feed: Arc::from(row.feed),
            event_type: row.event_type,
            bytes: row.bytes,
            end,
        }));
    }
    last
}

/// Rows after `after` (of `feed`, or of every feed), rendered, in `pos` order: at most
/// [`PAGE`] rows, and no more once `max_bytes` are reached (at least one row).
pub(super) fn read_rows(
    conn: &Connection,
    feed: Option<&str>,
    after: i64,
    max_bytes: usize,
) -> Result<Vec<Row>, DbError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    store::for_each_after(conn, feed, after, PAGE, |row| -> Result<bool, DbError> {
        let event_type = row.event_type()?;
        let rendered = render(row.pos, row.id()?, event_type, row.data()?);
        bytes += rendered.len();
        out.push(Row {
            pos: row.pos,
            feed: row.feed()?.to_string(),
            event_type: event_type.to_string(),
            bytes: rendered,
        });
        Ok(bytes < max_bytes)
    })?;
    Ok(out)
}

/// A few read-only connections to the database, shared by the clients.
///
/// Catching up is bulk work, taken in turns; a client's first read (finding its
/// `Last-Event-ID`, its first page) goes through a lane of its own, so that a new client gets
/// its first event at once however many others are catching up.
pub(super) struct Pool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    bulk: Semaphore,
    first: Semaphore,
}

impl Pool {
    pub(super) fn new(path: PathBuf) -> Pool {
        Pool {
            path,
            idle: Mutex::new(Vec::new()),
            bulk: Semaphore::new(POOL - 1),
            first: Semaphore::new(1),
        }
    }

    /// Runs `f` on a pooled connection, on a blocking thread, in the `first` lane or the bulk
    /// one. A connection that failed is dropped (the next use opens a new one).
    pub(super) async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        first: bool,
        f: impl FnOnce(&Connection) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, DbError> {
        let lane = if first { &self.first } else { &self.bulk };
        let _permit = lane.acquire().await.map_err(|_| DbError::Closed)?;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match idle {
                Some(c) => c,
                None => open_event_db(&pool.path)?,
            };
            let result = f(&conn);
            if result.is_ok() {
                pool.idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(conn);
            }
            result
        })
        .await?
    }
}

/// Reads new rows and publishes them until shutdown.
pub(super) fn poll_loop(shared: Shared, path: PathBuf, mut last: i64) {
    let mut conn: Option<Connection> = None;
    let mut failing = false;
    while !shared.shutdown.is_cancelled() {
        if conn.is_none() {
            match open_event_db(&path) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if !failing {
                        tracing::error!("cannot read new events (retrying): {e:#}");
                        failing = true;
                    }
                }
            }
        }
        if let Some(c) = &conn {
            while !shared.shutdown.is_cancelled() {
                match read_rows(c, None, last, POLL_PAGE_BYTES) {
                    Ok(page) => {
                        if failing {
                            tracing::info!(database = %path.display(), "reading new events again");
                            failing = false;
                        }
                        if !publish_page(&shared, page, &mut last) {
                            break;
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::error!(database = %path.display(), "cannot read new events (retrying): {e}");
                            failing = true;
                        }
                        conn = None;
                        break;
                    }
                }
            }
        }
        // In short steps, so that stopping never waits a long `poll_interval` out.
        let wake = std::time::Instant::now() + shared.options.poll_interval;
        while !shared.shutdown.is_cancelled() {
            let left = wake.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(std::time::Duration::from_millis(50)));
        }
    }
}

/// Whether `feed` has any stored event.
pub(super) fn feed_has_events(conn: &Connection, feed: &str) -> Result<bool, DbError> {
    Ok(store::feed_has_events(conn, feed)?)
}

/// The `pos` a client resuming after `id` continues from: the first stored event of `feed`
/// with that id, or the event at `@POS` for events stored without one. `None`: not stored.
pub(super) fn resume_pos(conn: &Connection, feed: &str, id: &str) -> Result<Option<i64>, DbError> {
    if let Some(pos) = store::pos_of_id(conn, feed, id, i64::MAX)? {
        return Ok(Some(pos));
    }
    if let Some(pos) = id.strip_prefix('@').and_then(|p| p.parse::<i64>().ok()) {
        if store::pos_is_of_feed(conn, feed, pos)? {
            return Ok(Some(pos));
        }
    }
    Ok(None)
}
