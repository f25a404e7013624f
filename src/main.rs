//! The `sse-bridge` command line: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::Utc;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sse_bridge::config::{LoadedConfig, LogFormat};
use sse_bridge::notify::Notifier;
use sse_bridge::secret::Redactor;
use sse_bridge::state::lock::StateLock;
use sse_bridge::state::{Gap, GapReason, StateStore};
use sse_bridge::supervisor::Registry;
use sse_bridge::text::escape_controls;

/// mimalloc for everything below [`LARGE_ALLOCATION`]: events are allocated by the feed tasks
/// and freed by the sink threads, and glibc's malloc pays for every such cross-thread free;
/// with mimalloc the bridge spends about a quarter less CPU per event (README, "Benchmark").
///
/// Allocations of [`LARGE_ALLOCATION`] or more (a huge event, up to `max_event_size`, and the
/// buffers that parse and encode it) go to the C library's malloc, which maps each one on its
/// own and unmaps it when it is freed (the mmap threshold is pinned in [`tune_allocator`]).
/// mimalloc keeps freed memory until its owning thread allocates again, and a feed that went
/// quiet after one 200 MiB event kept 469 MiB resident for good (ARCHITECTURE.md, "Hostile input
/// and bounded resources": memory given back). The hot path never allocates that much.
#[global_allocator]
static ALLOCATOR: BridgeAllocator = BridgeAllocator;

/// Allocations at least this large bypass mimalloc (see [`ALLOCATOR`]).
const LARGE_ALLOCATION: usize = 1024 * 1024;

/// The C library's malloc guarantees this alignment; larger alignments stay with mimalloc.
const MALLOC_ALIGNMENT: usize = 16;

struct BridgeAllocator;

impl BridgeAllocator {
    /// Whether a block of this size and alignment belongs to the C library's malloc. The same
    /// answer for the allocation and its deallocation, which get the same layout.
    fn is_large(size: usize, align: usize) -> bool {
        size >= LARGE_ALLOCATION && align <= MALLOC_ALIGNMENT
    }
}

// SAFETY: every block is freed by the allocator that made it: both sides decide with
// `is_large` on the same layout (Rust passes the allocation's layout to `dealloc`, and the old
// layout to `realloc`); a reallocation that crosses the threshold copies between them.
unsafe impl std::alloc::GlobalAlloc for BridgeAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::is_large(layout.size(), layout.align()) {
            libc::malloc(layout.size()).cast()
        } else {
            mimalloc::MiMalloc.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::is_large(layout.size(), layout.align()) {
            libc::calloc(1, layout.size()).cast()
        } else {
            mimalloc::MiMalloc.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if Self::is_large(layout.size(), layout.align()) {
            libc::free(ptr.cast());
        } else {
            mimalloc::MiMalloc.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let was_large = Self::is_large(layout.size(), layout.align());
        let is_large = Self::is_large(new_size, layout.align());
        match (was_large, is_large) {
            (true, true) => libc::realloc(ptr.cast(), new_size).cast(),
            (false, false) => mimalloc::MiMalloc.realloc(ptr, layout, new_size),
            _ => {
                let new_layout =
                    std::alloc::Layout::from_size_align_unchecked(new_size, layout.align());
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

extern "C" {
    /// mimalloc's `mi_option_set` (linked in by the `mimalloc` crate).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_arena_eager_commit` in mimalloc's `mimalloc.h` (the same in v2 and v3).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// mimalloc commits its arenas eagerly by default on Linux, which keeps the memory of many
/// small, long-lived allocations resident: 10 000 idle feeds took about 40 % more RSS than
/// with glibc's malloc, and the same as glibc with eager commit off (the CPU per event stays
/// mimalloc's). The environment variable `MIMALLOC_ARENA_EAGER_COMMIT` still overrides it.
///
/// The option must be set before the first allocation creates an arena, which happens before
/// `main` (the Rust runtime allocates while starting): so this runs as an ELF constructor,
/// and allocates nothing itself.
extern "C" fn tune_allocator() {
    // SAFETY: getenv with a NUL-terminated name, nothing allocated; mi_option_set only stores
    // an integer, and mimalloc reads its options lazily.
    unsafe {
        if libc::getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
        // Large blocks (see `ALLOCATOR`) are always mapped on their own and unmapped when
        // freed: a fixed threshold also turns off glibc's habit of raising it (up to 32 MiB)
        // after such a block is freed, which would keep the next ones in its heap.
        libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE_ALLOCATION as libc::c_int);
    }
}

#[used]
#[link_section = ".init_array"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

/// Exit status for a configuration that cannot be used (as distinct from a runtime failure).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "sse-bridge",
    version,
    about = "Pipe Server-Sent Events feeds into durable sinks, resuming with Last-Event-ID.",
    long_about = "sse-bridge subscribes to Server-Sent Events (EventSource) feeds, routes every \
event by feed and event type to sinks, and records each feed's Last-Event-ID in a SQLite state \
database once the sinks have stored the events. After a restart, even after kill -9, each feed \
resumes from that checkpoint: nothing the server still retains is lost, and at most one commit \
interval is fetched twice.\n\n\
Sinks: `file` (JSON Lines files, paths templated by feed and event type, with rotation, \
retention and compression), `sqlite` (rows of an SQLite database, stored exactly once), \
`kafka` (records confirmed by the broker), `postgres` (rows of a PostgreSQL table, stored exactly \
once), `stdout` (JSON Lines on standard output). Stored \
events come back out with `replay` (to a terminal, a file or another sink) and `serve` (a live \
Server-Sent Events endpoint that browsers and other bridges resume from).\n\n\
A fleet: with a [cluster] section, the same configuration runs on several machines sharing one \
PostgreSQL database; each feed is read by exactly one instance (a lease per feed, judged by the \
database's clock), and a dead, frozen or stopped instance's feeds move to the others within \
seconds. Checkpoints and gaps then live in that database. Connect every instance as one \
database role: the others end the transactions a frozen instance left open.\n\n\
Try it: `sse-bridge run` runs the built-in configuration (Wikimedia's recentchange stream into \
data/events/recentchange.jsonl, state in data/state.db).",
    after_help = "Configuration: a TOML file (see README.md, \"Configuration reference\"). \
Environment variables SSE_BRIDGE_<SECTION>__<KEY> override keys of the [state], [log], \
[shutdown], [routing], [admin], [serve] and [cluster] sections, e.g. \
SSE_BRIDGE_STATE__PATH=/var/lib/sse-bridge/state.db or SSE_BRIDGE_CLUSTER__INSTANCE=node-a.\n\
Exit status: 0 success, 1 runtime failure, 2 unusable configuration or arguments."
)]
struct Cli {
    /// Configuration file (TOML). Without it, the built-in default configuration is used
    /// (the same as config/sse-bridge.toml).
    #[arg(
        short,
        long,
        global = true,
        value_name = "FILE",
        env = "SSE_BRIDGE_CONFIG"
    )]
    config: Option<PathBuf>,

    /// Log line format: `human` or `json` (one object per line, for log shippers).
    /// Overrides `log.format`. Logs go to standard error.
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<LogFormat>,

    /// Log filter such as `debug` or `info,sse_bridge=trace`. Overrides `log.level`;
    /// `RUST_LOG`, when set, overrides both.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge until SIGTERM or SIGINT.
    ///
    /// Starts one EventSource subscription per enabled [[feed]], each resuming from its
    /// checkpoint, and one writer per [sink.NAME]. On SIGTERM or SIGINT it stops reading, lets
    /// the sinks store what they hold, commits the checkpoints and exits 0 (within
    /// `shutdown.timeout`). A second signal exits at once; nothing is lost either way, the
    /// checkpoint only covers stored events.
    ///
    /// One bridge per state database: `run` locks `STATE.lock` (beside `state.path`) for as
    /// long as it runs, and a second `run` on the same state database exits 1 naming the PID
    /// that holds it.
    ///
    /// With [cluster], the instance joins the fleet first (a database that cannot be reached
    /// fails the start) and runs only the feeds whose lease it holds; on SIGTERM it drains,
    /// commits and releases its leases, and the other instances take the feeds over at once.
    ///
    /// SIGHUP reloads the configuration file: a configuration that does not validate is
    /// rejected (logged) and the running one stays; feeds whose settings did not change keep
    /// their connection; changed feeds drain, commit and reconnect from their checkpoint;
    /// removed feeds drain and stop; new feeds start. Under systemd (`Type=notify`) it reports
    /// readiness, status, reloads and shutdown, and pets the watchdog.
    Run {
        /// Also reload when the configuration file changes on disk (checked every 2 s).
        #[arg(long)]
        watch_config: bool,
    },

    /// Check a configuration without running it.
    ///
    /// Reports every problem that can be found offline, each with the file and the key:
    /// syntax, unknown keys, types, URLs, header names, names used in templates, paths that
    /// would leave a sink's directory, routes to missing sinks, tokens named by
    /// bearer_token_env/bearer_token_file that are missing. Exits 0 when the configuration is
    /// usable, 2 otherwise.
    Validate,

    /// Show or change the stored checkpoints (stop the bridge first when changing them).
    ///
    /// Reads the SQLite state database; with [cluster] it refuses, naming the fleet's tables
    /// (sse_bridge_checkpoints) to read with psql instead.
    #[command(subcommand)]
    Checkpoints(CheckpointsCommand),

    /// List recorded gaps: moments a feed could not resume faithfully (a stream without
    /// ids, a rejected Last-Event-ID, a changed URL, a manual checkpoint change).
    ///
    /// With [cluster] the gaps are in the fleet's table sse_bridge_gaps: read it with psql.
    Gaps {
        /// Only this feed.
        #[arg(long)]
        feed: Option<String>,
        /// Print JSON Lines instead of a table.
        #[arg(long)]
        json: bool,
    },

    /// Play a stored log back: to the terminal, to another sink, at a chosen pace.
    ///
    /// Reads an SQLite database written by a `sqlite` sink, or what a `file` sink wrote (JSON
    /// Lines files and directories of them, rotated, gzip or zstd; or everything a sink's path
    /// template can have produced, with --sink NAME -c FILE), and writes the events it
    /// selects, in the order they were stored, each once, as JSON
    /// Lines (the file sink's format, byte for byte) or as `text/event-stream` on standard
    /// output, or through a sink of the configuration given with -c (`--to NAME`): that is how
    /// a Kafka topic or a file is backfilled from last week's log. Events keep their feed, id,
    /// seq and receive time.
    ///
    /// Filters combine: --feed, --type (a glob), --after-id or --after-seq, --since and
    /// --until. The whole selection is checked before anything is written, so a corrupt
    /// database or a broken line stops the replay with the file and the row or line named, and
    /// the target untouched. A progress bar with rate and ETA is shown on a terminal (plain
    /// counts every 5 s otherwise); the closing summary (events read, written, skipped) goes to
    /// standard error. --follow then keeps reading what the bridge appends, across rotations.
    #[command(after_long_help = "Examples:\n  \
        sse-bridge replay data/state.db --feed recentchange --type edit --since 2h\n  \
        sse-bridge replay data/events/recentchange.jsonl --format sse --rate 50/s\n  \
        sse-bridge replay data/state.db --since 7d -c backfill.toml --to kafka\n  \
        sse-bridge replay data/events/ --feed recentchange --since 2026-11-01\n  \
        sse-bridge replay --sink archive -c bridge.toml --follow --format sse\n\n\
        Exit status: 0 replayed, 1 the source, the output or the sink failed (nothing is \
        written when the source is broken), 2 unusable arguments.")]
    Replay(sse_bridge::replay::ReplayArgs),

    /// Serve stored events as Server-Sent Events, live, to browsers and other clients.
    ///
    /// Opens an SQLite database written by a `sqlite` sink (read-only), or the table of a
    /// `postgres` sink (`postgresql://USER@HOST/DB`, --table), and answers
    /// `GET /feeds/FEED/events` with a `text/event-stream` of the feed's stored events, then
    /// the new ones as they are stored (by a bridge in another process, or any writer of the
    /// same database; from PostgreSQL, woken by the sink's NOTIFY). `?type=GLOB` keeps only matching event types. The same server runs
    /// inside `run` when the config has a `[serve]` section, with the same settings as keys.
    ///
    /// Each event carries its original id; an event stored without one carries `@POS`. A
    /// client that reconnects with `Last-Event-ID` (or `?last_event_id=` / `?lastEventId=` on
    /// the first request) gets exactly the events after that one; an id that is not in the log
    /// is answered 410. Without one, the stream starts at the beginning of the stored log. A
    /// feed with no stored events that is not named with --feed is answered 404.
    ///
    /// Access: with --token-file, every request needs a token (`Authorization: Bearer TOKEN`,
    /// or `?access_token=TOKEN` for a browser's EventSource), 401 without one, 403 for a feed
    /// the token may not read; SIGHUP re-reads the file. Pages on other origins may read only
    /// when their origin is listed with --cors-origin (others get 403). --tls-cert and
    /// --tls-key serve HTTPS. Each client's connection, resume id and end are logged at INFO
    /// (never its token); /metrics counts clients and events per feed.
    ///
    /// Streams set `retry:`, send a `: heartbeat` comment every --heartbeat, and carry
    /// `Content-Type: text/event-stream`, `Cache-Control: no-cache` and `X-Accel-Buffering: no`.
    /// Every client has a buffer bounded in bytes (--client-buffer-bytes, and all of them
    /// together --max-buffered-bytes): a slow client never holds back the others or the
    /// bridge; one that falls more than --max-lag events (or --max-lag-bytes) behind, or reads
    /// nothing for --send-timeout, is disconnected and resumes with its Last-Event-ID. At most
    /// --max-clients connections are served at once (one more is answered 503 with
    /// Retry-After). Listens on 127.0.0.1:8080 unless --listen says otherwise.
    /// SIGTERM or SIGINT closes the streams and exits 0.
    #[command(after_long_help = "Examples:\n  \
        sse-bridge serve data/state.db --listen 127.0.0.1:8090 &\n  \
        curl -N 'http://127.0.0.1:8090/feeds/recentchange/events?type=edit'\n  \
        curl -N -H 'Last-Event-ID: 1234' http://127.0.0.1:8090/feeds/recentchange/events\n\n  \
        # for a dashboard on https://dash.example.org, with tokens (one per line)\n  \
        sse-bridge serve data/state.db --cors-origin https://dash.example.org \\\n      \
        --token-file /etc/sse-bridge/serve-tokens\n  \
        curl -N -H \"Authorization: Bearer $TOKEN\" http://127.0.0.1:8080/feeds/recentchange/events")]
    Serve(sse_bridge::serve::ServeArgs),

    /// Show the running bridge's feeds and sinks, read from its admin endpoint.
    ///
    /// One row per feed: state (connecting, open, closed, stopped), last event ID, age of the
    /// last event, events received, reconnections, the backoff being waited out, checkpoint
    /// lag and the last error; one row per sink: health, queue, events stored and dropped,
    /// write errors; then whether the bridge is ready (as `/readyz` says). In a fleet, OWNER
    /// and EPOCH columns, and rows for the feeds other instances read. The endpoint is the
    /// configuration's `[admin] listen` (-c), or --admin.
    Status {
        /// The admin endpoint, such as `http://127.0.0.1:9187` or `127.0.0.1:9187`.
        /// Default: `[admin] listen` of the configuration.
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// Print one JSON object (`feeds`, `sinks`, `ready`) instead of tables.
        #[arg(long)]
        json: bool,
    },

    /// Print events live as the running bridge routes them.
    ///
    /// Reads the admin endpoint's `/tap`: every event routed from now on (whether stored,
    /// dropped or unrouted), as JSON Lines in the file sink's format, or --pretty for people.
    /// The bridge never waits for a tap: when this command (or what reads its output) falls
    /// too far behind, events are skipped and a note saying how many goes to standard error.
    /// Runs until interrupted or until the bridge stops.
    #[command(after_long_help = "Examples:\n  \
        sse-bridge tap -c /etc/sse-bridge/sse-bridge.toml --feed recentchange --type edit\n  \
        sse-bridge tap --admin 127.0.0.1:9187 --pretty\n  \
        sse-bridge tap -c bridge.toml | jq -r .data")]
    Tap {
        /// The admin endpoint, such as `http://127.0.0.1:9187` or `127.0.0.1:9187`.
        /// Default: `[admin] listen` of the configuration.
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// Only feeds matching this name or glob.
        #[arg(long, value_name = "GLOB")]
        feed: Option<String>,
        /// Only event types matching this name or glob (such as `page.*` or `{edit,log}`).
        #[arg(long = "type", value_name = "GLOB")]
        event_type: Option<String>,
        /// A readable format: a header line per event, the data (indented JSON when it is
        /// JSON) below it.
        #[arg(long)]
        pretty: bool,
    },
}

#[derive(Subcommand)]
enum CheckpointsCommand {
    /// List every checkpoint: feed, sequence number, Last-Event-ID, time of commit, URL.
    List {
        /// Print JSON Lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make FEED resume from ID at its next start (recorded as a gap).
    Set {
        /// Feed name, as in the configuration.
        feed: String,
        /// The Last-Event-ID to send.
        id: String,
    },
    /// Forget FEED's checkpoint: it starts from the live end of the stream (recorded as a gap).
    Reset {
        /// Feed name.
        feed: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Status { .. } | Command::Tap { .. } = &cli.command {
        return admin_command(&cli);
    }
    let loaded = match LoadedConfig::load(cli.config.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: invalid configuration\n{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Validate = cli.command {
        let c = &loaded.config;
        println!(
            "{}: OK ({} feed(s), {} sink(s), {} route(s))",
            loaded.source,
            c.feed.len(),
            c.sink.len(),
            c.route.len()
        );
        return ExitCode::SUCCESS;
    }
    let format = cli.log_format.unwrap_or(loaded.config.log.format);
    let level = cli
        .log_level
        .clone()
        .unwrap_or_else(|| loaded.config.log.level.clone());
    if let Err(e) = sse_bridge::logging::init(format, &level) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // Before anything is logged: every log line is scrubbed of the feeds' credentials.
    config_redactor(&loaded).remember();
    let result = match cli.command {
        Command::Run { watch_config } => run(loaded, watch_config),
        Command::Validate => Ok(()),
        Command::Checkpoints(cmd) => checkpoints(&loaded, cmd),
        Command::Gaps { feed, json } => gaps(&loaded, feed.as_deref(), json),
        Command::Replay(args) => sse_bridge::replay::run(&args, &loaded).map(|_| ()),
        Command::Serve(args) => sse_bridge::serve::run(&args),
        // Handled before the configuration is validated (see `admin_command`).
        Command::Status { .. } | Command::Tap { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(loaded: LoadedConfig, watch_config: bool) -> anyhow::Result<()> {
    // Held until the process exits: one bridge per state database.
    let _lock = StateLock::acquire(&loaded.config.state.path)?;
    raise_open_file_limit(loaded.config.feed.len());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sse-bridge")
        .build()?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let signals = tokio::spawn(watch_signals(shutdown.clone(), reload_tx.clone()));
        let watcher = match (&loaded.path, watch_config) {
            (Some(path), true) => Some(tokio::spawn(watch_file(path.clone(), reload_tx))),
            (None, true) => {
                tracing::warn!(
                    "--watch-config needs -c FILE; the built-in configuration is not watched"
                );
                None
            }
            _ => None,
        };
        let registry = std::sync::Arc::new(Registry::default());
        let notifier = std::sync::Arc::new(Notifier::from_env());
        let result =
            sse_bridge::supervisor::run(loaded, registry, shutdown, reload_rx, notifier).await;
        signals.abort();
        if let Some(w) = watcher {
            w.abort();
        }
        result
    })
}

/// Raises the soft open-file limit to the hard limit (see `open_files`), and warns when even
/// the hard limit looks short for this many feeds.
fn raise_open_file_limit(feeds: usize) {
    let Some(limit) = sse_bridge::open_files::raise_to_hard_limit() else {
        return;
    };
    // A socket per feed, plus files, the state database and the admin endpoint.
    let needed = feeds as u64 + 256;
    if limit < needed {
        tracing::warn!(
            limit,
            feeds,
            "the open-file limit is low for this many feeds (each holds a socket); raise it with LimitNOFILE= in the systemd unit or ulimit -n"
        );
    }
}

/// SIGHUP: reload. First SIGTERM/SIGINT: drain. Second: exit at once (the checkpoint only
/// covers stored events, so nothing is lost; the rest is fetched again at the next start).
async fn watch_signals(shutdown: CancellationToken, reload: tokio::sync::mpsc::Sender<()>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the bridge with SIGKILL");
        return;
    };
    let mut draining = false;
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                // A reload already pending covers this one too.
                let _ = reload.try_send(());
                continue;
            }
        };
        if !draining {
            tracing::info!("{name} received: draining (send again to exit at once)");
            shutdown.cancel();
            draining = true;
        } else {
            tracing::warn!("{name} received again: exiting without draining");
            std::process::exit(1);
        }
    }
}

/// `--watch-config`: reload when the file's modification time or size changes (polled every
/// 2 s, which also works for editors that replace the file and for network file systems).
async fn watch_file(path: PathBuf, reload: tokio::sync::mpsc::Sender<()>) {
    let stamp = |p: &PathBuf| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut last = stamp(&path);
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        ticker.tick().await;
        let now = stamp(&path);
        if now != last {
            last = now;
            tracing::info!(file = %path.display(), "configuration file changed: reloading");
            let _ = reload.try_send(());
        }
    }
}

fn open_state(loaded: &LoadedConfig) -> anyhow::Result<StateStore> {
    not_in_a_fleet(loaded)?;
    Ok(StateStore::open(&loaded.config.state.path)?)
}

/// With `[cluster]` the checkpoints and gaps are in the fleet's database, not the SQLite file
/// these commands read (ARCHITECTURE.md §9).
fn not_in_a_fleet(loaded: &LoadedConfig) -> anyhow::Result<()> {
    if let Some(cluster) = &loaded.config.cluster {
        let database = cluster
            .connection()
            .map(|c| sse_bridge::sink::postgres::config::shown(&c))
            .unwrap_or_else(|_| "the database of `cluster.url`".to_string());
        anyhow::bail!(
            "{}: this configuration has [cluster]: checkpoints and gaps are in the fleet's \
             database ({database}), tables sse_bridge_checkpoints and sse_bridge_gaps; read \
             them with psql, and change a checkpoint only while every instance is stopped",
            loaded.source
        );
    }
    Ok(())
}

fn feed_url<'a>(loaded: &'a LoadedConfig, feed: &str) -> anyhow::Result<&'a str> {
    loaded
        .config
        .feed
        .iter()
        .find(|f| f.name == feed)
        .map(|f| f.url.as_str())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "feed `{feed}` is not in {}; checkpoints are keyed by the feed's name and URL",
                loaded.source
            )
        })
}

/// The secrets of every feed of the config, to scrub what the state database holds (URLs
/// are stored whole, userinfo included; gap details may quote server text).
fn config_redactor(loaded: &LoadedConfig) -> Redactor {
    let mut r = Redactor::default();
    for feed in &loaded.config.feed {
        r.extend(&Redactor::for_feed(feed));
    }
    r
}

/// A stored URL as the commands show it: without userinfo, query or fragment.
fn shown_url(url: &str) -> String {
    url::Url::parse(url)
        .map(|u| sse_bridge::sse::connection::display_url(&u))
        .unwrap_or_else(|_| "<not a URL>".to_string())
}

fn checkpoints(loaded: &LoadedConfig, cmd: CheckpointsCommand) -> anyhow::Result<()> {
    // Changing a checkpoint under a running bridge would be overwritten at its next commit
    // (or worse, move it backwards): `set` and `reset` need the bridge stopped.
    not_in_a_fleet(loaded)?;
    let _lock = match cmd {
        CheckpointsCommand::List { .. } => None,
        _ => Some(StateLock::acquire(&loaded.config.state.path)?),
    };
    let mut store = open_state(loaded)?;
    match cmd {
        CheckpointsCommand::List { json } => {
            let redactor = config_redactor(loaded);
            let mut rows = store.list_checkpoints()?;
            for c in &mut rows {
                c.url = shown_url(&c.url);
                redactor.scrub_string(&mut c.last_event_id);
            }
            if json {
                for cp in rows {
                    println!("{}", serde_json::to_string(&cp)?);
                }
            } else {
                print_table(
                    &["FEED", "SEQ", "LAST-EVENT-ID", "UPDATED", "URL"],
                    rows.iter()
                        .map(|c| {
                            vec![
                                c.feed.clone(),
                                c.seq.to_string(),
                                c.last_event_id.clone(),
                                c.updated_at
                                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                                c.url.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        CheckpointsCommand::Set { feed, id } => {
            let url = feed_url(loaded, &feed)?.to_string();
            store.set_checkpoint(&feed, &url, &id)?;
            store.record_gap(&manual_gap(
                &feed,
                &url,
                &id,
                format!("checkpoint set to `{id}` by an operator"),
            ))?;
            println!("{feed}: checkpoint set to `{id}`; the next start sends it as Last-Event-ID");
        }
        CheckpointsCommand::Reset { feed } => {
            let url = feed_url(loaded, &feed)
                .map(str::to_string)
                .unwrap_or_default();
            let n = store.reset_checkpoint(&feed)?;
            store.record_gap(&manual_gap(
                &feed,
                &url,
                "",
                "checkpoint reset by an operator".into(),
            ))?;
            println!("{feed}: {n} checkpoint(s) removed; the next start begins at the live end of the stream");
        }
    }
    Ok(())
}

fn manual_gap(feed: &str, url: &str, id: &str, detail: String) -> Gap {
    Gap::once(
        feed,
        url,
        GapReason::ManualChange,
        detail,
        id,
        0,
        Utc::now(),
    )
}

fn gaps(loaded: &LoadedConfig, feed: Option<&str>, json: bool) -> anyhow::Result<()> {
    let store = open_state(loaded)?;
    let redactor = config_redactor(loaded);
    let mut rows = store.list_gaps(feed)?;
    for g in &mut rows {
        g.url = shown_url(&g.url);
        redactor.scrub_string(&mut g.detail);
        redactor.scrub_string(&mut g.last_event_id);
    }
    if json {
        for g in rows {
            println!("{}", serde_json::to_string(&g)?);
        }
    } else {
        print_table(
            &["AT", "FEED", "REASON", "TIMES", "LAST-EVENT-ID", "DETAIL"],
            rows.iter()
                .map(|g| {
                    let times = if g.repeats > 1 {
                        format!(
                            "{} (last {})",
                            g.repeats,
                            g.last_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        )
                    } else {
                        "1".to_string()
                    };
                    vec![
                        g.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        g.feed.clone(),
                        g.reason.as_str().to_string(),
                        times,
                        g.last_event_id.clone(),
                        g.detail.clone(),
                    ]
                })
                .collect(),
        );
    }
    Ok(())
}

/// Prints a table for people: cells come from the stream (ids, details), so their control
/// characters are escaped (a raw ESC would drive the terminal; a line break would break the
/// table).
fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|cell| escape_controls(&cell).into_owned())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `status` and `tap`: clients of a running bridge. The configuration is only read for
/// `[admin] listen` (not validated: an operator's shell may lack the feeds' token variables).
fn admin_command(cli: &Cli) -> ExitCode {
    let admin = match &cli.command {
        Command::Status { admin, .. } | Command::Tap { admin, .. } => admin.as_deref(),
        _ => None,
    };
    let config = match admin {
        Some(_) => None,
        None => match LoadedConfig::parse(cli.config.as_deref()) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("error: invalid configuration\n{e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let base = match sse_bridge::admin::client::endpoint(
        admin,
        config.as_ref().and_then(|l| l.config.admin.as_ref()),
    ) {
        Ok(url) => url,
        Err(e) => {
            let source = config
                .map(|l| format!("{}: ", l.source))
                .unwrap_or_default();
            eprintln!("error: {source}{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Tap {
        feed, event_type, ..
    } = &cli.command
    {
        for (flag, pattern) in [("--feed", feed), ("--type", event_type)] {
            if let Some(Err(e)) = pattern
                .as_deref()
                .map(sse_bridge::admin::client::check_glob)
            {
                eprintln!("error: {flag}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let result = match &cli.command {
        Command::Status { json, .. } => sse_bridge::admin::client::status(&base, *json),
        Command::Tap {
            feed,
            event_type,
            pretty,
            ..
        } => sse_bridge::admin::client::tap(&base, feed.as_deref(), event_type.as_deref(), *pretty),
        _ => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
