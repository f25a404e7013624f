//! `replay` from a `postgres` sink's table: pages in `pos` order with the filters in SQL, and
//! `--follow` woken by the sink's `NOTIFY` at each commit (with a slow poll as a safety net).
//!
//! Replay is synchronous; the driver is not: the log keeps a small runtime of its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use super::Filter;
use crate::event::Event;
use crate::sink::postgres::config::{shown, table_problem};
use crate::sink::postgres::NOTIFY_CHANNEL;

/// Rows per page.
const PAGE: i64 = 1000;

/// With `--follow`, the table is read again at least this often even without a notification.
const SAFETY_POLL: Duration = Duration::from_secs(2);

/// Whether `source` names a PostgreSQL database (a connection URL).
pub fn is_postgres_url(source: &str) -> bool {
    source.starts_with("postgresql://") || source.starts_with("postgres://")
}

/// A `postgres` sink's table, read back.
pub struct PostgresLog {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    notified: tokio::sync::mpsc::UnboundedReceiver<()>,
    table: String,
    /// What messages call it: `postgresql://user@host:port/db table`.
    pub shown: String,
    /// The last `pos` included (fixed by the first scan).
    end: Option<i64>,
}

impl PostgresLog {
    /// Connects (never showing the password), checks the table, and listens for commits.
    pub fn open(connection: tokio_postgres::Config, table: &str) -> anyhow::Result<PostgresLog> {
        if let Some(problem) = table_problem(table) {
            bail!("--table: {problem}");
        }
        let shown = format!("{} table {table}", shown(&connection));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let tls = crate::sink::postgres::tls_connector(None).map_err(|e| anyhow!("{e}"))?;
        let (client, notified) = runtime.block_on(async {
            let (client, mut connection) = connection
                .connect(tls)
                .await
                .with_context(|| format!("cannot connect to {shown}"))?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            // The connection task: drives the protocol, and turns notifications into wake-ups.
            tokio::spawn(async move {
                loop {
                    let message =
                        futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await;
                    match message {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                            let _ = tx.send(());
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    }
                }
            });
            anyhow::Ok((client, rx))
        })?;
        let mut log = PostgresLog {
            runtime,
            client,
            notified,
            table: table.to_string(),
            shown,
            end: None,
        };
        log.block(|client, table| async move {
            client
                .simple_query(&format!("SELECT pos FROM {table} LIMIT 0"))
                .await
                .map(|_| ())
        })
        .context("no events table there (is it the table a postgres sink writes? see --table)")?;
        Ok(log)
    }

    fn block<'a, T, F>(
        &'a mut self,
        f: impl FnOnce(&'a tokio_postgres::Client, &'a str) -> F,
    ) -> anyhow::Result<T>
    where
        F: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let shown = self.shown.clone();
        let future = f(&self.client, &self.table);
        self.runtime.block_on(future).map_err(|e| {
            let text = match e.as_db_error() {
                Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                None => e.to_string(),
            };
            anyhow!("{shown}: {text}")
        })
    }

    fn last_pos(&mut self) -> anyhow::Result<i64> {
        self.block(|client, table| async move {
            let row = client
                .query_one(&format!("SELECT COALESCE(MAX(pos), 0) FROM {table}"), &[])
                .await?;
            Ok(row.get::<_, i64>(0))
        })
    }

    /// Calls `visit` for every event the filter selects, in `pos` order, up to the end the
    /// first call fixes; returns how many rows that end covers.
    pub fn scan(
        &mut self,
        filter: &Filter,
        visit: &mut dyn FnMut(Event) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        let end = match self.end {
            Some(end) => end,
            None => {
                let end = self.last_pos()?;
                self.end = Some(end);
                end
            }
        };
        let total: i64 = self.block(|client, table| async move {
            let row = client
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE pos <= $1"),
                    &[&end],
                )
                .await?;
            Ok(row.get(0))
        })?;
        let mut start = 0i64;
        if let (Some(id), Some(feed)) = (&filter.after_id, &filter.feed) {
            let (id, feed) = (id.clone(), feed.clone());
            let found: Option<i64> = self.block(|client, table| async move {
                let row = client
                    .query_one(
                        &format!(
                            "SELECT MIN(pos) FROM {table} WHERE feed = $1 AND id = $2 AND pos <= $3"
                        ),
                        &[&feed, &id, &end],
                    )
                    .await?;
                Ok(row.get(0))
            })?;
            match found {
                Some(pos) => start = pos,
                None => bail!(
                    "{}: feed `{}` has no event with id {:?}",
                    self.shown,
                    filter.feed.as_deref().unwrap_or_default(),
                    filter.after_id.as_deref().unwrap_or_default()
                ),
            }
        }
        let (sql, extra) = page_query(&self.table, filter);
        loop {
            let rows = self.page(&sql, start, end, &extra)?;
            let Some(last) = rows.last().map(|(pos, _)| *pos) else {
                break;
            };
            for (_, event) in rows {
                if filter.matches(&event) {
                    visit(event)?;
                }
            }
            start = last;
        }
        Ok(u64::try_from(total).unwrap_or(0))
    }

    fn page(
        &mut self,
        sql: &str,
        after: i64,
        end: i64,
        extra: &[Param],
    ) -> anyhow::Result<Vec<(i64, Event)>> {
        let sql = sql.to_string();
        let extra = extra.to_vec();
        self.block(|client, _| async move {
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after, &end];
            for p in &extra {
                params.push(p.as_sql());
            }
            let rows = client.query(&sql, &params).await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let seq: i64 = r.get(2);
                    let received_at: DateTime<Utc> = r.get(6);
                    let event = Event {
                        feed: std::sync::Arc::from(r.get::<_, &str>(1)),
                        seq: u64::try_from(seq).unwrap_or(0),
                        id: std::sync::Arc::from(r.get::<_, &str>(3)),
                        event_type: std::sync::Arc::from(r.get::<_, &str>(4)),
                        data: r.get::<_, String>(5),
                        received_at,
                    };
                    (r.get::<_, i64>(0), event)
                })
                .collect())
        })
    }

    /// `--follow`: after the stored history, the rows committed since, as the sink's `NOTIFY`
    /// (or the safety poll) says there are some, until `stop`.
    pub fn follow(
        &mut self,
        stop: &AtomicBool,
        emit: &mut dyn FnMut(Vec<Event>) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        self.block(|client, _| async move {
            client
                .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
                .await
        })?;
        let (sql, extra) = page_query(&self.table, &Filter::default());
        while !stop.load(Ordering::SeqCst) {
            let Some(mut from) = self.end else {
                return Ok(());
            };
            let end = self.last_pos()?;
            while from < end {
                let rows = self.page(&sql, from, end, &extra)?;
                let Some(last) = rows.last().map(|(pos, _)| *pos) else {
                    break;
                };
                from = last;
                if !emit(rows.into_iter().map(|(_, e)| e).collect())? {
                    return Ok(());
                }
            }
            self.end = Some(end);
            // Until a commit is notified, the safety poll comes, or stopping is asked.
            let deadline = std::time::Instant::now() + SAFETY_POLL;
            while std::time::Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                let woke = self.runtime.block_on(async {
                    tokio::time::timeout(Duration::from_millis(100), self.notified.recv())
                        .await
                        .is_ok()
                });
                if woke {
                    while self.notified.try_recv().is_ok() {}
                    break;
                }
            }
        }
        Ok(())
    }

    /// The end of the log as the first scan fixed it.
    pub fn end(&self) -> Option<i64> {
        self.end
    }
}

/// A filter value bound to the page query.
#[derive(Debug, Clone)]
enum Param {
    Text(String),
    Int(i64),
    Time(DateTime<Utc>),
}

impl Param {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(v) => v,
            Param::Int(v) => v,
            Param::Time(v) => v,
        }
    }
}

/// The page query with the filters SQL can apply (`$1` after, `$2` end, then the filters).
fn page_query(table: &str, filter: &Filter) -> (String, Vec<Param>) {
    let mut sql = format!(
        "SELECT pos, feed, seq, id, type, data, received_at FROM {table} WHERE pos > $1 AND pos <= $2"
    );
    let mut params = Vec::new();
    let mut add = |clause: &str, p: Param| {
        params.push(p);
        sql.push_str(&format!(" AND {clause} ${}", params.len() + 2));
    };
    if let Some(feed) = &filter.feed {
        add("feed =", Param::Text(feed.clone()));
    }
    if let Some(t) = &filter.exact_type {
        add("type =", Param::Text(t.clone()));
    }
    if let Some(n) = filter.after_seq {
        add("seq >", Param::Int(i64::try_from(n).unwrap_or(i64::MAX)));
    }
    if let Some(t) = filter.since {
        add("received_at >=", Param::Time(t));
    }
    if let Some(t) = filter.until {
        add("received_at <", Param::Time(t));
    }
    sql.push_str(&format!(" ORDER BY pos LIMIT {PAGE}"));
    (sql, params)
}
