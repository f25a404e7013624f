//! Logging through tracing-subscriber, to standard error (standard output may be a sink).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. The filter comes from `RUST_LOG` when set, else from
/// `level` (the command line or the config's `log.level`).
pub fn init(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::builder()
            .parse(&v)
            .map_err(|e| anyhow::anyhow!("RUST_LOG=`{v}` is not a valid log filter: {e}"))?,
        _ => EnvFilter::builder()
            .parse(level)
            .map_err(|e| anyhow::anyhow!("log level `{level}` is not a valid log filter: {e}"))?,
    };
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
