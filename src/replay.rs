//! `sse-bridge replay`: plays a stored log back, from an SQLite sink database or the JSON
//! Lines files of a file sink (a rotated, compressed series: `series`), to standard output
//! (JSON Lines or `text/event-stream`) or through a configured sink (`--to`), with filters,
//! pacing and a progress report; `--follow` then keeps reading what the bridge appends
//! (`follow`).
//!
//! Replay reads its source twice: a first pass decodes and checks every event the filters
//! select and counts them (so the progress bar has a total), a second pass writes them. A
//! broken source (a corrupt or foreign database, a missing table, a bad row, a broken JSON
//! line) is therefore reported, naming the file and the row or line, before anything is
//! written. Events appended to the source while replay runs are not included: both passes
//! stop where the first pass ended (`--follow` continues from there).

mod follow;
pub mod postgres;
mod series;

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, NaiveDate, Utc};
use globset::GlobMatcher;
use rusqlite::types::Value;
use rusqlite::Connection;

use crate::config::LoadedConfig;
use crate::event::Event;
use crate::sink::{Sink, SinkConfig};
use crate::sse::encode::encode_sse;
use crate::store::jsonl;
use crate::store::sqlite::{self as store, RowView, EVENT_COLUMNS};

/// Events per page read from a database, and per batch handed to a sink.
const PAGE: usize = 1000;
/// The first bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";
/// How often counts are printed when standard error is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `sse-bridge replay` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The stored log: an SQLite database written by a `sqlite` sink (or the state database
    /// it shares), a PostgreSQL database written by a `postgres` sink
    /// (`postgresql://USER@HOST/DB`, its table named by --table; the password from
    /// `PGPASSWORD`, never on the command line), or the JSON Lines files of a `file` sink: files (plain, gzip or zstd, told
    /// apart by their first bytes, not their names) and directories holding a sink's series
    /// (searched below, `.tmp` leftovers and hidden files left out). Several JSON Lines paths
    /// are merged into one log. Files are only read.
    #[arg(value_name = "SOURCE", required_unless_present = "sink")]
    pub source: Vec<PathBuf>,

    /// Replay what the sink `[sink.NAME]` of the configuration given with -c stored: for a
    /// file sink every file its path template, rotation and compression can have produced
    /// (any feed, type or strftime period), for an SQLite sink its database, for a PostgreSQL
    /// sink its table.
    #[arg(long, value_name = "NAME", conflicts_with = "source")]
    pub sink: Option<String>,

    /// The table of a PostgreSQL source given as a URL.
    #[arg(long, value_name = "NAME", default_value = "sse_events")]
    pub table: String,

    /// After the stored history, keep reading what the bridge appends, across rotations (as
    /// `tail -F` does), until interrupted (SIGINT, SIGTERM) or the output is closed.
    #[arg(long, conflicts_with = "rate")]
    pub follow: bool,

    /// Only events of this feed (exact name).
    #[arg(long, value_name = "NAME")]
    pub feed: Option<String>,

    /// Only events whose type matches this glob (`edit`, `page.*`, `{edit,log}`).
    #[arg(long = "type", value_name = "GLOB")]
    pub event_type: Option<String>,

    /// Only events after the first event of the feed with this id, as a server resuming with
    /// `Last-Event-ID` would. Needs --feed. An id that is not in the log is an error.
    #[arg(
        long,
        value_name = "ID",
        conflicts_with = "after_seq",
        requires = "feed"
    )]
    pub after_id: Option<String>,

    /// Only events whose sequence number is greater than N.
    #[arg(long, value_name = "N")]
    pub after_seq: Option<u64>,

    /// Only events received at or after TIME: RFC 3339 (`2026-11-24T08:00:00Z`), a date
    /// (`2026-11-24`, midnight UTC), or a duration ago (`2h`, `7d`).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,

    /// Only events received before TIME (same forms as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,

    /// Output on standard output: `jsonl` (the file sink's format, byte for byte) or `sse`
    /// (`text/event-stream` framing: `id:`, `event:`, one `data:` line per line of data).
    #[arg(
        long,
        value_name = "FORMAT",
        default_value = "jsonl",
        conflicts_with = "to"
    )]
    pub format: OutputFormat,

    /// Write the events through the sink `[sink.NAME]` of the configuration given with -c
    /// (a Kafka topic, a file, an SQLite database) instead of standard output. The events
    /// keep their feed, id, seq and receive time. An SQLite sink ignores events it already
    /// holds, so a replay can be repeated.
    #[arg(long, value_name = "SINK")]
    pub to: Option<String>,

    /// Pace the replay: at most N events per second (`500`, `500/s`, `30000/m`, `100/h`).
    #[arg(long, value_name = "N/s")]
    pub rate: Option<String>,

    /// No progress bar or progress lines (the closing summary is still printed).
    #[arg(long, short)]
    pub quiet: bool,
}

/// See [`ReplayArgs::format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Jsonl,
    Sse,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events in the source (up to where replay started).
    pub read: u64,
    /// Events written to the output.
    pub written: u64,
    /// Events the filters left out.
    pub skipped: u64,
    /// Events stored twice (the same feed and `seq`) and written once.
    pub duplicates: u64,
    /// Events written by `--follow` after the history.
    pub followed: u64,
}

/// Which events to replay.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub feed: Option<String>,
    pub event_type: Option<GlobMatcher>,
    /// The type when it is a plain name (pushed down to SQL).
    pub exact_type: Option<String>,
    pub after_id: Option<String>,
    pub after_seq: Option<u64>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    /// Builds the filter from the command line; errors are about the arguments.
    pub fn from_args(args: &ReplayArgs, now: DateTime<Utc>) -> anyhow::Result<Filter> {
        let (event_type, exact_type) = match &args.event_type {
            None => (None, None),
            Some(t) => {
                let glob = crate::route::compile_pattern(t).map_err(|e| anyhow!("--type: {e}"))?;
                let exact = (!t.contains(['*', '?', '[', '{', '\\'])).then(|| t.clone());
                (Some(glob), exact)
            }
        };
        let since = args
            .since
            .as_deref()
            .map(|s| parse_time(s, now).map_err(|e| anyhow!("--since {s:?}: {e}")))
            .transpose()?;
        let until = args
            .until
            .as_deref()
            .map(|s| parse_time(s, now).map_err(|e| anyhow!("--until {s:?}: {e}")))
            .transpose()?;
        Ok(Filter {
            feed: args.feed.clone(),
            event_type,
            exact_type,
            after_id: args.after_id.clone(),
            after_seq: args.after_seq,
            since,
            until,
        })
    }

    /// Everything but `after_id` (which depends on the events before).
    fn matches(&self, e: &Event) -> bool {
        self.feed.as_deref().is_none_or(|f| *e.feed == *f)
            && self
                .event_type
                .as_ref()
                .is_none_or(|g| g.is_match(&*e.event_type))
            && self.after_seq.is_none_or(|n| e.seq > n)
            && self.since.is_none_or(|t| e.received_at >= t)
            && self.until.is_none_or(|t| e.received_at < t)
    }
}

/// A `--since`, `--until` or `--rate` value that cannot be used; the caller names the option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error(
        "expected an RFC 3339 time (2026-11-24T08:00:00Z), a date (2026-11-24) or a \
         duration ago (2h, 7d)"
    )]
    NotATime,
    #[error("too far in the past")]
    TooFarBack,
    #[error("unknown unit `{0}`: use /s, /m or /h")]
    RateUnit(String),
    #[error("`{0}` is not a rate such as 500/s")]
    NotARate(String),
    #[error("`{0}`: the rate must be greater than zero")]
    RateNotPositive(String),
}

/// Parses `--since`/`--until`: RFC 3339, a date, or a duration before `now`.
pub fn parse_time(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ArgError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = humantime::parse_duration(s) {
        // A duration chrono cannot hold is as far back as one it can but the clock cannot.
        let d = chrono::Duration::from_std(d).map_err(|_| ArgError::TooFarBack)?;
        return now.checked_sub_signed(d).ok_or(ArgError::TooFarBack);
    }
    Err(ArgError::NotATime)
}

/// Parses `--rate`: events per second.
pub fn parse_rate(s: &str) -> Result<f64, ArgError> {
    let (n, per) = match s.split_once('/') {
        Some((n, unit)) => {
            let per = match unit.trim() {
                "s" | "sec" | "second" => 1.0,
                "m" | "min" | "minute" => 60.0,
                "h" | "hour" => 3600.0,
                other => return Err(ArgError::RateUnit(other.to_string())),
            };
            (n, per)
        }
        None => (s, 1.0),
    };
    let n: f64 = n
        .trim()
        .parse()
        .map_err(|_| ArgError::NotARate(s.to_string()))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(ArgError::RateNotPositive(s.to_string()));
    }
    Ok(n / per)
}

// ---------------------------------------------------------------------------------------------
// Sources

/// A stored log.
pub enum Source {
    Sqlite(SqliteLog),
    /// A `postgres` sink's table.
    Postgres(postgres::PostgresLog),
    /// JSON Lines files merged into one log (directories, several files, compressed files,
    /// a file sink's series).
    Series(SeriesSource),
}

/// A log of JSON Lines files, and how to list its files again (for `--follow`).
pub struct SeriesSource {
    log: series::SeriesLog,
    discover: Rc<dyn Fn() -> anyhow::Result<Vec<PathBuf>>>,
    /// What the summary calls the source.
    what: String,
}

impl Source {
    /// The source the arguments name: paths, or `--sink NAME` of the configuration.
    pub fn from_args(args: &ReplayArgs, loaded: &LoadedConfig) -> anyhow::Result<Source> {
        if let Some(name) = &args.sink {
            let Some(config) = loaded.config.sink.get(name) else {
                bail!(
                    "--sink {name}: {} has no [sink.{name}]; give the configuration with -c",
                    loaded.source
                );
            };
            return match config {
                SinkConfig::File(c) => {
                    let (n, c) = (name.clone(), c.clone());
                    let discover: Rc<dyn Fn() -> anyhow::Result<Vec<PathBuf>>> =
                        Rc::new(move || series::discover_sink(&n, &c));
                    Source::series(discover, false, format!("sink `{name}`"))
                }
                SinkConfig::Sqlite(c) => Ok(Source::Sqlite(SqliteLog::open(&c.path)?)),
                SinkConfig::Postgres(c) => {
                    let connection = c.connection().map_err(|e| anyhow!("--sink {name}: {e}"))?;
                    Ok(Source::Postgres(postgres::PostgresLog::open(
                        connection, &c.table,
                    )?))
                }
                other => bail!(
                    "--sink {name}: a {} sink keeps nothing replay can read back (file, \
                     sqlite and postgres sinks do)",
                    other.kind()
                ),
            };
        }
        if let [one] = args.source.as_slice() {
            if let Some(url) = one.to_str().filter(|u| postgres::is_postgres_url(u)) {
                let connection = crate::sink::postgres::config::parse_connection(url)
                    .map_err(|e| anyhow!("{e}"))?;
                return Ok(Source::Postgres(postgres::PostgresLog::open(
                    connection,
                    &args.table,
                )?));
            }
            if is_sqlite(one) {
                return Ok(Source::Sqlite(SqliteLog::open(one)?));
            }
        }
        let paths = args.source.clone();
        // Files named one by one: a last line without a line end means the file was cut
        // short, unless --follow says it is being written.
        let strict = !args.follow
            && paths
                .iter()
                .all(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()));
        let what = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let discover: Rc<dyn Fn() -> anyhow::Result<Vec<PathBuf>>> =
            Rc::new(move || series::discover_paths(&paths));
        Source::series(discover, strict, what)
    }

    fn series(
        discover: Rc<dyn Fn() -> anyhow::Result<Vec<PathBuf>>>,
        strict: bool,
        what: String,
    ) -> anyhow::Result<Source> {
        let paths = discover()?;
        let log = series::SeriesLog::open(paths, strict)?;
        Ok(Source::Series(SeriesSource {
            log,
            discover,
            what,
        }))
    }

    /// Calls `visit` for every event the filter selects, in log order; returns the number of
    /// events read. The first call fixes the end of the log: later calls stop there.
    pub fn scan(
        &mut self,
        filter: &Filter,
        visit: &mut dyn FnMut(Event) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        match self {
            Source::Sqlite(s) => s.scan(filter, visit),
            Source::Postgres(p) => p.scan(filter, visit),
            Source::Series(s) => scan_series(&mut s.log, filter, visit),
        }
    }
}

/// Whether `path` is an SQLite database (by its first bytes).
fn is_sqlite(path: &Path) -> bool {
    let mut head = [0u8; 16];
    File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .is_ok_and(|n| n == head.len() && &head == SQLITE_HEADER)
}

/// A series scan with the filters, `after_id` included (in the merged order).
fn scan_series(
    log: &mut series::SeriesLog,
    filter: &Filter,
    visit: &mut dyn FnMut(Event) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut found_after = filter.after_id.is_none();
    // Files that start after --until or end before --since are not opened (the filter still
    // applies to every event of the files that are).
    // With --after-id the id is looked for from the start.
    let since = filter.since.filter(|_| filter.after_id.is_none());
    let read = log.scan(since, filter.until, &mut |event| {
        if !found_after {
            if filter.feed.as_deref() == Some(&*event.feed)
                && filter.after_id.as_deref() == Some(&*event.id)
            {
                found_after = true;
            }
            return Ok(());
        }
        if filter.matches(&event) {
            visit(event)?;
        }
        Ok(())
    })?;
    if !found_after {
        bail!(
            "feed `{}` has no event with id {:?} in {} files",
            filter.feed.as_deref().unwrap_or(""),
            filter.after_id.as_deref().unwrap_or(""),
            log.files.len()
        );
    }
    Ok(read)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// An SQLite database with the sink's `events` table.
pub struct SqliteLog {
    path: PathBuf,
    conn: Connection,
    /// The last `pos` included (fixed by the first scan).
    end: Option<i64>,
}

impl SqliteLog {
    /// Opens a database read-only and checks that it has the sink's `events` table.
    pub fn open(path: &Path) -> anyhow::Result<SqliteLog> {
        let conn = store::open_read_only(path)?;
        Ok(SqliteLog {
            path: path.to_path_buf(),
            conn,
            end: None,
        })
    }

    fn scan(
        &mut self,
        filter: &Filter,
        visit: &mut dyn FnMut(Event) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        let shown = self.path.display().to_string();
        let sql_err = |e: rusqlite::Error| anyhow!("{shown}: {e}");
        let end = match self.end {
            Some(end) => end,
            None => {
                let end = store::last_pos(&self.conn).map_err(sql_err)?;
                self.end = Some(end);
                end
            }
        };
        let read: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM events WHERE pos <= ?1", [end], |r| {
                r.get(0)
            })
            .map_err(sql_err)?;
        let mut start = 0i64;
        if let (Some(id), Some(feed)) = (&filter.after_id, &filter.feed) {
            let found = store::pos_of_id(&self.conn, feed, id, end).map_err(sql_err)?;
            match found {
                Some(pos) => start = pos,
                None => bail!("{shown}: feed `{feed}` has no event with id {id:?}"),
            }
        }
        let mut sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE pos > ?1 AND pos <= ?2");
        let mut params: Vec<Value> = vec![Value::Integer(start), Value::Integer(end)];
        let mut add = |clause: &str, v: Value| {
            params.push(v);
            sql.push_str(&format!(" AND {clause} ?{}", params.len()));
        };
        // `+column` keeps SQLite from answering a page through an index on that column and
        // sorting by `pos` afterwards (a sort of everything left, for every page): the pages
        // walk the table in `pos` order from the cursor, so a whole replay reads each row once.
        if let Some(feed) = &filter.feed {
            add("+feed =", Value::Text(feed.clone()));
        }
        if let Some(t) = &filter.exact_type {
            add("+type =", Value::Text(t.clone()));
        }
        if let Some(n) = filter.after_seq {
            add(
                "+seq >",
                Value::Integer(i64::try_from(n).unwrap_or(i64::MAX)),
            );
        }
        if let Some(t) = filter.since {
            add("+received_at >=", Value::Text(jsonl::format_time(t)));
        }
        if let Some(t) = filter.until {
            add("+received_at <", Value::Text(jsonl::format_time(t)));
        }
        sql.push_str(&format!(" ORDER BY pos LIMIT {PAGE}"));
        let mut page: Vec<(i64, Event)> = Vec::with_capacity(PAGE);
        loop {
            page.clear();
            {
                let mut stmt = self.conn.prepare_cached(&sql).map_err(sql_err)?;
                let mut rows = stmt
                    .query(rusqlite::params_from_iter(params.iter()))
                    .map_err(sql_err)?;
                while let Some(row) = rows.next().map_err(sql_err)? {
                    let row = RowView::new(row).map_err(|e| anyhow!("{shown}: {e}"))?;
                    let event = row.event().map_err(|e| anyhow!("{shown}: {e}"))?;
                    page.push((row.pos, event));
                }
            }
            let Some(&(last, _)) = page.last() else { break };
            for (_, event) in page.drain(..) {
                // The SQL already applied everything but a type glob; check all the same.
                if filter.matches(&event) {
                    visit(event)?;
                }
            }
            params[0] = Value::Integer(last);
        }
        Ok(u64::try_from(read).unwrap_or(0))
    }
}

impl SqliteLog {
    /// `--follow`: the rows added since the last scan, in `pos` order (unfiltered).
    fn scan_new(
        &mut self,
        visit: &mut dyn FnMut(Event) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let shown = self.path.display().to_string();
        let sql_err = |e: rusqlite::Error| anyhow!("{shown}: {e}");
        let Some(mut from) = self.end else {
            return Ok(());
        };
        let end = store::last_pos(&self.conn).map_err(sql_err)?;
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE pos > ?1 AND pos <= ?2 ORDER BY pos LIMIT {PAGE}"
        );
        loop {
            let mut page = Vec::new();
            {
                let mut stmt = self.conn.prepare_cached(&sql).map_err(sql_err)?;
                let mut rows = stmt.query([from, end]).map_err(sql_err)?;
                while let Some(row) = rows.next().map_err(sql_err)? {
                    let row = RowView::new(row).map_err(|e| anyhow!("{shown}: {e}"))?;
                    page.push((row.pos, row.event().map_err(|e| anyhow!("{shown}: {e}"))?));
                }
            }
            let Some(&(last, _)) = page.last() else { break };
            for (_, e) in page {
                visit(e)?;
            }
            from = last;
        }
        self.end = Some(end);
        Ok(())
    }
}

/// Opens an SQLite database read-only and checks for the sink's `events` table, with errors
/// that name the file and say what is wrong (`store::sqlite::open_read_only`).
pub fn open_event_db(path: &Path) -> Result<Connection, store::OpenError> {
    store::open_read_only(path)
}

// ---------------------------------------------------------------------------------------------
// Outputs and the replay itself

/// Where events go.
pub enum Output {
    /// JSON Lines or SSE on a writer (standard output).
    Stream {
        format: OutputFormat,
        out: Box<dyn Write>,
    },
    /// A configured sink.
    Sink { name: String, sink: Box<dyn Sink> },
}

impl Output {
    /// Builds the output the arguments ask for: `--to` needs the loaded configuration.
    pub fn from_args(args: &ReplayArgs, loaded: &LoadedConfig) -> anyhow::Result<Output> {
        match &args.to {
            None => Ok(Output::Stream {
                format: args.format,
                out: Box::new(std::io::BufWriter::with_capacity(
                    256 * 1024,
                    std::io::stdout(),
                )),
            }),
            Some(name) => {
                let Some(config) = loaded.config.sink.get(name) else {
                    let names: Vec<&str> = loaded.config.sink.keys().map(String::as_str).collect();
                    bail!(
                        "--to {name}: {} has no [sink.{name}] (its sinks: {}); give the \
                         configuration with -c",
                        loaded.source,
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    );
                };
                let sink = config
                    .build(name)
                    .with_context(|| format!("starting sink `{name}`"))?;
                Ok(Output::Sink {
                    name: name.clone(),
                    sink,
                })
            }
        }
    }
}

/// Writes events to an [`Output`], in batches.
struct Writer {
    output: Output,
    buf: Vec<u8>,
    batch: Vec<Arc<Event>>,
    written: u64,
}

impl Writer {
    fn push(&mut self, event: Event) -> anyhow::Result<()> {
        match &mut self.output {
            Output::Stream { format, .. } => {
                match format {
                    OutputFormat::Jsonl => jsonl::encode(&event, &mut self.buf),
                    OutputFormat::Sse => encode_sse(
                        Some(&event.id),
                        &event.event_type,
                        &event.data,
                        &mut self.buf,
                    ),
                }
                self.written += 1;
                if self.buf.len() >= 256 * 1024 {
                    self.drain()?;
                }
            }
            Output::Sink { .. } => {
                self.batch.push(Arc::new(event));
                self.written += 1;
                if self.batch.len() >= PAGE {
                    self.drain()?;
                }
            }
        }
        Ok(())
    }

    /// Hands over everything held (without flushing a stream).
    fn drain(&mut self) -> anyhow::Result<()> {
        match &mut self.output {
            Output::Stream { out, .. } => {
                out.write_all(&self.buf)
                    .context("cannot write to standard output")?;
                self.buf.clear();
            }
            Output::Sink { name, sink } => {
                if !self.batch.is_empty() {
                    sink.write(&self.batch)
                        .with_context(|| format!("writing to sink `{name}`"))?;
                    self.batch.clear();
                }
            }
        }
        Ok(())
    }

    /// Makes everything written so far visible (before pausing, and at the end).
    fn flush(&mut self) -> anyhow::Result<()> {
        self.drain()?;
        match &mut self.output {
            Output::Stream { out, .. } => out.flush().context("cannot write to standard output"),
            Output::Sink { name, sink } => sink
                .flush()
                .with_context(|| format!("flushing sink `{name}`")),
        }
    }
}

/// Reports progress: a bar on a terminal, plain lines otherwise, nothing when quiet. Over
/// JSON Lines files it counts bytes read from the files (compressed sizes where compressed),
/// over a database events.
struct Progress {
    kind: ProgressKind,
    /// Bytes read so far, when counting bytes.
    bytes: Option<Arc<std::sync::atomic::AtomicU64>>,
    total: u64,
}

enum ProgressKind {
    Bar(indicatif::ProgressBar),
    Plain { last: Instant, started: Instant },
    Quiet,
}

impl Progress {
    fn new(total: u64, bytes: Option<Arc<std::sync::atomic::AtomicU64>>, quiet: bool) -> Progress {
        let kind = if quiet {
            ProgressKind::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            let template = if bytes.is_some() {
                "{elapsed_precise} [{wide_bar}] {binary_bytes}/{binary_total_bytes}  \
                 {binary_bytes_per_sec}  ETA {eta}"
            } else {
                "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} events  {rate}  ETA {eta}"
            };
            let style = indicatif::ProgressStyle::with_template(template).map(|s| {
                s.progress_chars("=> ").with_key(
                    "rate",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", state.per_sec());
                    },
                )
            });
            if let Ok(style) = style {
                bar.set_style(style);
            }
            ProgressKind::Bar(bar)
        } else {
            ProgressKind::Plain {
                last: Instant::now(),
                started: Instant::now(),
            }
        };
        Progress { kind, bytes, total }
    }

    fn update(&mut self, written: u64) {
        let bytes = self
            .bytes
            .as_ref()
            .map(|b| b.load(Ordering::Relaxed).min(self.total));
        match &mut self.kind {
            ProgressKind::Bar(bar) => bar.set_position(bytes.unwrap_or(written)),
            ProgressKind::Plain { last, started } => {
                if last.elapsed() >= PLAIN_PROGRESS_EVERY {
                    *last = Instant::now();
                    let secs = started.elapsed().as_secs_f64().max(1e-3);
                    let rate = written as f64 / secs;
                    match bytes {
                        Some(b) => eprintln!(
                            "replay: {:.1}/{:.1} MiB read, {written} events written ({rate:.0}/s)",
                            b as f64 / 1048576.0,
                            self.total as f64 / 1048576.0
                        ),
                        None => eprintln!(
                            "replay: {written}/{} events written ({rate:.0}/s)",
                            self.total
                        ),
                    }
                }
            }
            ProgressKind::Quiet => {}
        }
    }

    fn finish(&self) {
        if let ProgressKind::Bar(bar) = &self.kind {
            bar.finish_and_clear();
        }
    }
}

/// Paces output at `rate` events per second.
struct Pacer {
    rate: f64,
    started: Instant,
}

impl Pacer {
    /// How long to wait before the `n`-th event (0-based), if at all.
    fn delay(&self, n: u64) -> Option<Duration> {
        let due = Duration::from_secs_f64(n as f64 / self.rate);
        due.checked_sub(self.started.elapsed())
            .filter(|d| *d >= Duration::from_millis(1))
    }
}

/// Runs a replay: checks the whole selection first, then opens the output (so a broken source
/// creates nothing) and writes the selection to it; with `stop`, then follows the source
/// until `stop` is set or the output goes away.
pub fn replay(
    source: &mut Source,
    filter: &Filter,
    output: impl FnOnce() -> anyhow::Result<Output>,
    rate: Option<f64>,
    quiet: bool,
    stop: Option<&AtomicBool>,
) -> anyhow::Result<Summary> {
    // Pass 1: decode and check every selected event, and count them.
    let mut total = 0u64;
    source.scan(filter, &mut |_| {
        total += 1;
        Ok(())
    })?;
    let output = output()?;
    // Pass 2: write.
    let mut progress = match source {
        Source::Series(s) => {
            Progress::new(s.log.total_bytes(), Some(s.log.read_bytes.clone()), quiet)
        }
        Source::Sqlite(_) | Source::Postgres(_) => Progress::new(total, None, quiet),
    };
    let mut writer = Writer {
        output,
        buf: Vec::with_capacity(256 * 1024),
        batch: Vec::with_capacity(PAGE),
        written: 0,
    };
    let pacer = rate.map(|rate| Pacer {
        rate,
        started: Instant::now(),
    });
    let read = source.scan(filter, &mut |event| {
        if let Some(delay) = pacer.as_ref().and_then(|p| p.delay(writer.written)) {
            writer.flush()?;
            progress.update(writer.written);
            std::thread::sleep(delay);
        }
        writer.push(event)?;
        if writer.written % 1024 == 0 {
            progress.update(writer.written);
        }
        Ok(())
    })?;
    writer.flush()?;
    progress.update(writer.written);
    progress.finish();
    let mut summary = Summary {
        read,
        written: writer.written,
        skipped: read.saturating_sub(writer.written),
        ..Summary::default()
    };
    if let Source::Series(s) = source {
        summary.duplicates = s.log.duplicates;
        summary.skipped = summary.skipped.saturating_sub(summary.duplicates);
    }
    if let Some(stop) = stop {
        summary.followed = follow(source, filter, &mut writer, stop)?;
    }
    Ok(summary)
}

/// `--follow` after the history: events written until `stop` or the output closes.
fn follow(
    source: &mut Source,
    filter: &Filter,
    writer: &mut Writer,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut written = 0u64;
    let mut emit = |events: Vec<Event>| -> anyhow::Result<bool> {
        for event in events {
            if filter.matches(&event) {
                writer.push(event)?;
                written += 1;
            }
        }
        match writer.flush() {
            Ok(()) => Ok(true),
            // The reader went away (`| head`): following ends there.
            Err(e) if is_broken_pipe(&e) => Ok(false),
            Err(e) => Err(e),
        }
    };
    match source {
        Source::Series(s) => {
            let discover = s.discover.clone();
            let mut f = follow::Follow::new(&mut s.log, Box::new(move || discover()));
            f.run(stop, &mut emit)?;
        }
        Source::Postgres(p) => p.follow(stop, &mut emit)?,
        Source::Sqlite(db) => {
            // New rows past the last position read, every poll.
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                let mut events = Vec::new();
                db.scan_new(&mut |e| {
                    events.push(e);
                    Ok(())
                })?;
                if !emit(events)? {
                    break;
                }
                while started.elapsed() < follow::POLL && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    Ok(written)
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Sets the returned flag on SIGINT or SIGTERM (for `--follow`, which ends on them).
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    // Registered here, before the history is read, so that a signal never kills the replay
    // half-way through writing.
    let (mut term, mut int) = runtime
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .context("cannot watch SIGINT and SIGTERM")?;
    std::thread::Builder::new()
        .name("replay-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            flag.store(true, Ordering::SeqCst);
        })
        .context("cannot start the signal watcher")?;
    Ok(stop)
}

/// `sse-bridge replay`: the whole command. Prints the summary on standard error.
pub fn run(args: &ReplayArgs, loaded: &LoadedConfig) -> anyhow::Result<Summary> {
    let filter = Filter::from_args(args, Utc::now())?;
    let rate = args
        .rate
        .as_deref()
        .map(|r| parse_rate(r).map_err(|e| anyhow!("--rate: {e}")))
        .transpose()?;
    let stop = if args.follow {
        Some(stop_on_signals()?)
    } else {
        None
    };
    let mut source = Source::from_args(args, loaded)?;
    let summary = replay(
        &mut source,
        &filter,
        || Output::from_args(args, loaded),
        rate,
        args.quiet,
        stop.as_deref(),
    )?;
    let from = match &source {
        Source::Sqlite(db) => db.path.display().to_string(),
        Source::Postgres(p) => p.shown.clone(),
        Source::Series(s) => s.what.clone(),
    };
    eprintln!(
        "replay: {} events read, {} written, {} skipped{}{} (from {from}{})",
        summary.read,
        summary.written,
        summary.skipped,
        if summary.duplicates > 0 {
            format!(", {} stored twice and written once", summary.duplicates)
        } else {
            String::new()
        },
        if args.follow {
            format!(", {} more while following", summary.followed)
        } else {
            String::new()
        },
        match &args.to {
            Some(name) => format!(" to sink `{name}`"),
            None => String::new(),
        }
    );
    if let Source::Series(s) = &source {
        let opened: Vec<String> = s
            .log
            .opened
            .iter()
            .map(|&i| s.log.files[i].path.display().to_string())
            .collect();
        eprintln!(
            "replay: {} files read ({:.1} MiB): {}",
            opened.len(),
            s.log.total_bytes() as f64 / 1048576.0,
            if opened.is_empty() {
                "none".to_string()
            } else {
                opened.join(", ")
            }
        );
        let torn: Vec<String> = s
            .log
            .files
            .iter()
            .filter(|f| f.torn)
            .map(|f| f.path.display().to_string())
            .collect();
        if !torn.is_empty() && !args.follow {
            eprintln!(
                "replay: the last line of {} was still being written and was left out",
                torn.join(", ")
            );
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_rates_parse() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = |s| parse_time(s, now).unwrap().to_rfc3339();
        assert_eq!(t("2026-11-24T09:30:00+01:00"), "2026-11-24T08:30:00+00:00");
        assert_eq!(t("2026-11-20"), "2026-11-20T00:00:00+00:00");
        assert_eq!(t("2h"), "2026-11-24T06:00:00+00:00");
        assert_eq!(t("7d"), "2026-11-17T08:00:00+00:00");
        assert_eq!(parse_time("yesterday", now), Err(ArgError::NotATime));
        assert_eq!(
            parse_time("100000000000y", now),
            Err(ArgError::TooFarBack),
            "a duration beyond the calendar"
        );
        assert_eq!(parse_rate("500").unwrap(), 500.0);
        assert_eq!(parse_rate("500/s").unwrap(), 500.0);
        assert_eq!(parse_rate("120/m").unwrap(), 2.0);
        assert_eq!(
            parse_rate("0/s"),
            Err(ArgError::RateNotPositive("0/s".into()))
        );
        assert_eq!(parse_rate("5/week"), Err(ArgError::RateUnit("week".into())));
        assert_eq!(
            parse_rate("fast").unwrap_err().to_string(),
            "`fast` is not a rate such as 500/s"
        );
    }

    #[test]
    fn pacer_spreads_events() {
        let p = Pacer {
            rate: 100.0,
            started: Instant::now(),
        };
        assert!(p.delay(0).is_none());
        let d = p.delay(50).unwrap();
        assert!(
            d > Duration::from_millis(400) && d <= Duration::from_millis(500),
            "{d:?}"
        );
    }
}
