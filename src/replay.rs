//! `sse-bridge replay`: plays a stored log back, from an SQLite sink database or a JSON Lines
//! file written by the file sink, to standard output (JSON Lines or `text/event-stream`) or
//! through a configured sink (`--to`), with filters, pacing and a progress report.
//!
//! Replay reads its source twice: a first pass decodes and checks every event the filters
//! select and counts them (so the progress bar has a total), a second pass writes them. A
//! broken source (a corrupt or foreign database, a missing table, a bad row, a broken JSON
//! line) is therefore reported, naming the file and the row or line, before anything is
//! written. Events appended to the source while replay runs are not included: both passes
//! stop where the first pass ended.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, NaiveDate, Utc};
use globset::{GlobBuilder, GlobMatcher};
use rusqlite::types::Value;
use rusqlite::Connection;

use crate::config::LoadedConfig;
use crate::event::Event;
use crate::sink::Sink;
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
    /// it shares), or a JSON Lines file written by a `file` sink. The kind is recognised by
    /// the file's first bytes. The file is only read.
    #[arg(value_name = "SOURCE")]
    pub source: PathBuf,

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
                let glob = GlobBuilder::new(t)
                    .literal_separator(false)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| anyhow!("--type {t:?} is not a valid glob: {e}"))?;
                let exact = (!t.contains(['*', '?', '[', '{', '\\'])).then(|| t.clone());
                (Some(glob.compile_matcher()), exact)
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
    Jsonl(JsonlLog),
}

impl Source {
    /// Opens `path`, recognising an SQLite database by its header and anything else as JSON
    /// Lines. Checks an SQLite database's schema.
    pub fn open(path: &Path) -> anyhow::Result<Source> {
        let shown = path.display();
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {shown}"))?;
        if !meta.is_file() {
            bail!("{shown} is not a regular file");
        }
        let mut head = [0u8; 16];
        let mut file = File::open(path).with_context(|| format!("cannot open {shown}"))?;
        let n = read_up_to(&mut file, &mut head).with_context(|| format!("cannot read {shown}"))?;
        if n == head.len() && &head == SQLITE_HEADER {
            Ok(Source::Sqlite(SqliteLog::open(path)?))
        } else {
            Ok(Source::Jsonl(JsonlLog {
                path: path.to_path_buf(),
                limit: None,
            }))
        }
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
            Source::Jsonl(j) => j.scan(filter, visit),
        }
    }
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

/// Opens an SQLite database read-only and checks for the sink's `events` table, with errors
/// that name the file and say what is wrong (`store::sqlite::open_read_only`).
pub fn open_event_db(path: &Path) -> Result<Connection, store::OpenError> {
    store::open_read_only(path)
}

/// A JSON Lines file written by the file sink.
pub struct JsonlLog {
    path: PathBuf,
    /// (lines, bytes) read by the first scan: later scans stop there.
    limit: Option<(u64, u64)>,
}

impl JsonlLog {
    fn scan(
        &mut self,
        filter: &Filter,
        visit: &mut dyn FnMut(Event) -> anyhow::Result<()>,
    ) -> anyhow::Result<u64> {
        let shown = self.path.display().to_string();
        let file = File::open(&self.path).with_context(|| format!("cannot open {shown}"))?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut line = Vec::with_capacity(4096);
        let mut number = 0u64;
        let mut bytes = 0u64;
        let mut found_after = filter.after_id.is_none();
        loop {
            if self.limit.is_some_and(|(lines, _)| number >= lines) {
                break;
            }
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read {shown}"))?;
            if n == 0 {
                break;
            }
            number += 1;
            bytes += n as u64;
            let at = || format!("{shown}: line {number}");
            let text = std::str::from_utf8(&line)
                .map_err(|e| anyhow!("{}: not valid UTF-8 ({e})", at()))?;
            if text.trim().is_empty() {
                bail!("{}: the line is empty; a file sink never writes one", at());
            }
            if !text.ends_with('\n') {
                bail!(
                    "{}: the last line is incomplete (no line end): was the file cut short?",
                    at()
                );
            }
            let event = jsonl::decode(text).map_err(|e| anyhow!("{}: {e}", at()))?;
            if !found_after {
                if filter.feed.as_deref() == Some(&*event.feed)
                    && filter.after_id.as_deref() == Some(&*event.id)
                {
                    found_after = true;
                }
                continue;
            }
            if filter.matches(&event) {
                visit(event)?;
            }
        }
        if self.limit.is_none() {
            self.limit = Some((number, bytes));
        }
        if !found_after {
            bail!(
                "{shown}: feed `{}` has no event with id {:?}",
                filter.feed.as_deref().unwrap_or(""),
                filter.after_id.as_deref().unwrap_or("")
            );
        }
        Ok(number)
    }
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

/// Reports progress: a bar on a terminal, plain lines otherwise, nothing when quiet.
enum Progress {
    Bar(indicatif::ProgressBar),
    Plain {
        total: u64,
        last: Instant,
        started: Instant,
    },
    Quiet,
}

impl Progress {
    fn new(total: u64, quiet: bool) -> Progress {
        if quiet {
            return Progress::Quiet;
        }
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} events  {rate}  ETA {eta}",
            )
            .map(|s| {
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
            Progress::Bar(bar)
        } else {
            Progress::Plain {
                total,
                last: Instant::now(),
                started: Instant::now(),
            }
        }
    }

    fn update(&mut self, written: u64) {
        match self {
            Progress::Bar(bar) => bar.set_position(written),
            Progress::Plain {
                total,
                last,
                started,
            } => {
                if last.elapsed() >= PLAIN_PROGRESS_EVERY {
                    *last = Instant::now();
                    let rate = written as f64 / started.elapsed().as_secs_f64().max(1e-3);
                    eprintln!("replay: {written}/{total} events written ({rate:.0}/s)");
                }
            }
            Progress::Quiet => {}
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
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
/// creates nothing) and writes the selection to it.
pub fn replay(
    source: &mut Source,
    filter: &Filter,
    output: impl FnOnce() -> anyhow::Result<Output>,
    rate: Option<f64>,
    quiet: bool,
) -> anyhow::Result<Summary> {
    // Pass 1: decode and check every selected event, and count them.
    let mut total = 0u64;
    source.scan(filter, &mut |_| {
        total += 1;
        Ok(())
    })?;
    let output = output()?;
    // Pass 2: write.
    let mut progress = Progress::new(total, quiet);
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
    Ok(Summary {
        read,
        written: writer.written,
        skipped: read.saturating_sub(writer.written),
    })
}

/// `sse-bridge replay`: the whole command. Prints the summary on standard error.
pub fn run(args: &ReplayArgs, loaded: &LoadedConfig) -> anyhow::Result<Summary> {
    let filter = Filter::from_args(args, Utc::now())?;
    let rate = args
        .rate
        .as_deref()
        .map(|r| parse_rate(r).map_err(|e| anyhow!("--rate: {e}")))
        .transpose()?;
    let mut source = Source::open(&args.source)?;
    let summary = replay(
        &mut source,
        &filter,
        || Output::from_args(args, loaded),
        rate,
        args.quiet,
    )?;
    eprintln!(
        "replay: {} events read, {} written, {} skipped (from {}{})",
        summary.read,
        summary.written,
        summary.skipped,
        args.source.display(),
        match &args.to {
            Some(name) => format!(" to sink `{name}`"),
            None => String::new(),
        }
    );
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
