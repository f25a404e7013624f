//! `serve` from a `postgres` sink's table: the same pages, lookups and live tail as from SQLite
//! (`db.rs`), over a few pooled connections, the tail woken by the sink's `NOTIFY` at each
//! commit instead of polling (with a slow poll as a safety net).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::db::{render, DbError, Row, PAGE, POLL_PAGE_BYTES, POOL};
use super::Shared;
use crate::sink::postgres::NOTIFY_CHANNEL;

/// Without a notification, the table is read again this often all the same.
const SAFETY_POLL: Duration = Duration::from_secs(1);

/// A few connections to the database, shared by the clients, in a first-read lane and a bulk
/// lane as the SQLite pool.
pub(super) struct PgPool {
    connection: tokio_postgres::Config,
    pub(super) table: String,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    idle: Mutex<Vec<tokio_postgres::Client>>,
    bulk: Semaphore,
    first: Semaphore,
}

impl PgPool {
    pub(super) fn new(connection: tokio_postgres::Config, table: String) -> Result<PgPool, String> {
        Ok(PgPool {
            connection,
            table,
            tls: crate::sink::postgres::tls_connector(None)?,
            idle: Mutex::new(Vec::new()),
            bulk: Semaphore::new(POOL - 1),
            first: Semaphore::new(1),
        })
    }

    /// What log lines call the source.
    pub(super) fn shown(&self) -> String {
        format!(
            "{} table {}",
            crate::sink::postgres::config::shown(&self.connection),
            self.table
        )
    }

    /// A new connection, its protocol driven by a task of its own; with `notify`, each
    /// notification it receives is forwarded there.
    async fn connect(
        &self,
        notify: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    ) -> Result<tokio_postgres::Client, DbError> {
        let (client, mut connection) = self
            .connection
            .connect(self.tls.clone())
            .await
            .map_err(|e| DbError::Pg(format!("cannot connect to {}: {e}", self.shown())))?;
        tokio::spawn(async move {
            loop {
                let m = futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await;
                match m {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                        if let Some(tx) = &notify {
                            let _ = tx.send(());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        });
        Ok(client)
    }

    async fn client(&self) -> Result<tokio_postgres::Client, DbError> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(c) = idle.filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        self.connect(None).await
    }

    fn give_back(&self, client: tokio_postgres::Client) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client);
    }

    fn error(&self, e: &tokio_postgres::Error) -> DbError {
        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
            return DbError::NoTable;
        }
        let text = match e.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => e.to_string(),
        };
        DbError::Pg(format!("{}: {text}", self.shown()))
    }

    /// Runs the queries of `f` on a pooled connection in a lane; a connection that failed is
    /// dropped.
    async fn with<T>(
        &self,
        first: bool,
        f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, DbError> {
        let lane = if first { &self.first } else { &self.bulk };
        let _permit = lane.acquire().await.map_err(|_| DbError::Closed)?;
        let client = self.client().await?;
        match f(&client).await {
            Ok(v) => {
                self.give_back(client);
                Ok(v)
            }
            Err(e) => {
                let e = self.error(&e);
                // A missing table is an answer, not a broken connection.
                if matches!(e, DbError::NoTable) {
                    self.give_back(client);
                }
                Err(e)
            }
        }
    }

    /// Rows after `after` (of `feed`, or of every feed), rendered, in `pos` order: at most
    /// [`PAGE`] rows, and no more once `max_bytes` are reached (at least one row).
    pub(super) async fn page(
        &self,
        first: bool,
        feed: Option<&str>,
        after: i64,
        max_bytes: usize,
    ) -> Result<Vec<Row>, DbError> {
        let table = &self.table;
        let rows = match self
            .with(first, async |c| match feed {
                Some(feed) => {
                    c.query(
                        &format!(
                            "SELECT pos, feed, id, type, data FROM {table} \
                             WHERE pos > $1 AND feed = $2 ORDER BY pos LIMIT {PAGE}"
                        ),
                        &[&after, &feed],
                    )
                    .await
                }
                None => {
                    c.query(
                        &format!(
                            "SELECT pos, feed, id, type, data FROM {table} \
                             WHERE pos > $1 ORDER BY pos LIMIT {PAGE}"
                        ),
                        &[&after],
                    )
                    .await
                }
            })
            .await
        {
            // The sink creates its table at its first write: until then there is nothing.
            Err(DbError::NoTable) => Vec::new(),
            other => other?,
        };
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for r in &rows {
            let pos: i64 = r.get(0);
            let event_type: &str = r.get(3);
            let rendered = render(pos, r.get(2), event_type, r.get(4));
            bytes += rendered.len();
            out.push(Row {
                pos,
                feed: r.get::<_, String>(1),
                event_type: event_type.to_string(),
                bytes: rendered,
            });
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Whether `feed` is known (configured, or with stored events), and where a client
    /// resuming after `resume` continues from.
    pub(super) async fn lookup(
        &self,
        feed: &str,
        configured: bool,
        resume: Option<&str>,
    ) -> Result<(bool, Option<i64>), DbError> {
        let table = &self.table;
        let found = self
            .with(true, async |c| {
                let known = configured
                    || c.query_one(
                        &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE feed = $1)"),
                        &[&feed],
                    )
                    .await?
                    .get::<_, bool>(0);
                let Some(id) = resume.filter(|_| known) else {
                    return Ok((known, None));
                };
                let pos: Option<i64> = c
                    .query_one(
                        &format!("SELECT MIN(pos) FROM {table} WHERE feed = $1 AND id = $2"),
                        &[&feed, &id],
                    )
                    .await?
                    .get(0);
                if pos.is_some() {
                    return Ok((known, pos));
                }
                if let Some(at) = id.strip_prefix('@').and_then(|p| p.parse::<i64>().ok()) {
                    let here: bool = c
                        .query_one(
                            &format!(
                            "SELECT EXISTS (SELECT 1 FROM {table} WHERE pos = $1 AND feed = $2)"
                        ),
                            &[&at, &feed],
                        )
                        .await?
                        .get(0);
                    if here {
                        return Ok((known, Some(at)));
                    }
                }
                Ok((known, None))
            })
            .await;
        match found {
            Err(DbError::NoTable) => Ok((configured, None)),
            other => other,
        }
    }

    /// The `pos` of the newest row (0 when there is none).
    pub(super) async fn last_pos(&self) -> Result<i64, DbError> {
        let table = &self.table;
        let last = self
            .with(true, async |c| {
                Ok(
                    c.query_one(&format!("SELECT COALESCE(MAX(pos), 0) FROM {table}"), &[])
                        .await?
                        .get::<_, i64>(0),
                )
            })
            .await;
        match last {
            Err(DbError::NoTable) => Ok(0),
            other => other,
        }
    }
}

/// The live tail: `LISTEN` on a connection of its own, then read and publish what was
/// committed after `last` at every notification (or the safety poll), until shutdown.
pub(super) async fn tail(shared: Shared, pool: Arc<PgPool>, mut last: i64) {
    let mut failing = false;
    while !shared.shutdown.is_cancelled() {
        let (tx, mut notified) = tokio::sync::mpsc::unbounded_channel::<()>();
        let listener = match pool.connect(Some(tx)).await {
            Ok(client) => match client
                .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
                .await
            {
                Ok(()) => Some(client),
                Err(e) => {
                    if !failing {
                        tracing::error!("serve: cannot listen for new events (retrying): {e}");
                        failing = true;
                    }
                    None
                }
            },
            Err(e) => {
                if !failing {
                    tracing::error!("serve: cannot read new events (retrying): {e}");
                    failing = true;
                }
                None
            }
        };
        let Some(listener) = listener else {
            tokio::select! {
                _ = tokio::time::sleep(SAFETY_POLL) => {}
                _ = shared.shutdown.cancelled() => {}
            }
            continue;
        };
        // Read, publish, wait: until the listening connection breaks or the server stops.
        while !shared.shutdown.is_cancelled() && !listener.is_closed() {
            loop {
                match pool.page(false, None, last, POLL_PAGE_BYTES).await {
                    Ok(page) => {
                        if failing {
                            tracing::info!(source = %pool.shown(), "serve: reading new events again");
                            failing = false;
                        }
                        if !super::db::publish_page(&shared, page, &mut last) {
                            break;
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::error!("serve: cannot read new events (retrying): {e}");
                            failing = true;
                        }
                        break;
                    }
                }
            }
            tokio::select! {
                _ = notified.recv() => { while notified.try_recv().is_ok() {} }
                _ = tokio::time::sleep(SAFETY_POLL) => {}
                _ = shared.shutdown.cancelled() => {}
            }
        }
        // The listening connection broke: a floor before the next one.
        tokio::select! {
            _ = tokio::time::sleep(SAFETY_POLL) => {}
            _ = shared.shutdown.cancelled() => {}
        }
    }
}
