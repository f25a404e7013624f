//! The `sse-bridge` command line: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::Utc;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sse_bridge::config::{LoadedConfig, LogFormat};
use sse_bridge::notify::Notifier;
use sse_bridge::state::{Gap, GapReason, StateStore};
use sse_bridge::supervisor::Registry;

/// Exit status for a configuration that cannot be used (as distinct from a runtime failure).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "sse-bridge",
    version,
    about = "Pipe Server-Sent Events feeds into durable sinks, resuming with Last-Event-ID.",
    long_about = "sse-bridge subscribes to Server-Sent Events (EventSource) feeds, routes every \
event by feed and event type to sinks (JSON Lines files, standard output), and records each \
feed's Last-Event-ID in a SQLite state database once the sinks have stored the events. After a \
restart, even after kill -9, each feed resumes from that checkpoint: nothing the server still \
retains is lost, and at most one commit interval is fetched twice.\n\n\
Try it: `sse-bridge run` runs the built-in configuration (Wikimedia's recentchange stream into \
data/events/recentchange.jsonl, state in data/state.db).",
    after_help = "Configuration: a TOML file (see README.md, \"Configuration reference\"). \
Environment variables SSE_BRIDGE_<SECTION>__<KEY> override keys of the [state], [log], \
[shutdown] and [routing] sections, e.g. SSE_BRIDGE_STATE__PATH=/var/lib/sse-bridge/state.db.\n\
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
    #[command(subcommand)]
    Checkpoints(CheckpointsCommand),

    /// List recorded gaps: moments a feed could not resume faithfully (a stream without
    /// ids, a rejected Last-Event-ID, a changed URL, a manual checkpoint change).
    Gaps {
        /// Only this feed.
        #[arg(long)]
        feed: Option<String>,
        /// Print JSON Lines instead of a table.
        #[arg(long)]
        json: bool,
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
    let result = match cli.command {
        Command::Run { watch_config } => run(loaded, watch_config),
        Command::Validate => Ok(()),
        Command::Checkpoints(cmd) => checkpoints(&loaded, cmd),
        Command::Gaps { feed, json } => gaps(&loaded, feed.as_deref(), json),
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
    Ok(StateStore::open(&loaded.config.state.path)?)
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

fn checkpoints(loaded: &LoadedConfig, cmd: CheckpointsCommand) -> anyhow::Result<()> {
    let mut store = open_state(loaded)?;
    match cmd {
        CheckpointsCommand::List { json } => {
            let rows = store.list_checkpoints()?;
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
    Gap {
        feed: feed.to_string(),
        url: url.to_string(),
        reason: GapReason::ManualChange,
        detail,
        last_event_id: id.to_string(),
        seq: 0,
        at: Utc::now(),
    }
}

fn gaps(loaded: &LoadedConfig, feed: Option<&str>, json: bool) -> anyhow::Result<()> {
    let store = open_state(loaded)?;
    let rows = store.list_gaps(feed)?;
    if json {
        for g in rows {
            println!("{}", serde_json::to_string(&g)?);
        }
    } else {
        print_table(
            &["AT", "FEED", "REASON", "LAST-EVENT-ID", "DETAIL"],
            rows.iter()
                .map(|g| {
                    vec![
                        g.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        g.feed.clone(),
                        g.reason.as_str().to_string(),
                        g.last_event_id.clone(),
                        g.detail.clone(),
                    ]
                })
                .collect(),
        );
    }
    Ok(())
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
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
