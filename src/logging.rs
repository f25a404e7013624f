//! Logging through tracing-subscriber, to standard error (standard output may be a sink).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Parses a log filter exactly like `EnvFilter::builder().parse`, minus a panic of
/// tracing-subscriber 0.3: a directive with leading whitespace and a non-ASCII character (such
/// as `info, é=debug`) is sliced at an offset of its trimmed text, inside a character. The
/// parser trims every directive anyway, so they are trimmed first, which makes the offsets
/// agree; ASCII filters, which cannot hit the bug, are passed on unchanged. Found by the
/// `config_load` fuzz target (`fuzz/`).
pub fn parse_filter(filter: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    if filter.is_ascii() {
        return EnvFilter::builder().parse(filter);
    }
    let directives: Vec<&str> = filter.split(',').map(str::trim).collect();
    EnvFilter::builder().parse(directives.join(","))
}

/// Standard error, each log line scrubbed of every secret value the process knows
/// ([`crate::secret::scrub_remembered`]): the last line of defence, for a message that quotes a
/// credential wherever it was made. tracing-subscriber writes an event with one `write_all`, so
/// a secret is never split between two writes.
struct ScrubbingStderr;

impl std::io::Write for ScrubbingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        match std::str::from_utf8(buf).map(crate::secret::scrub_remembered) {
            Ok(std::borrow::Cow::Owned(scrubbed)) => err.write_all(scrubbed.as_bytes())?,
            _ => err.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The human format's fields, as tracing-subscriber writes them (the message, then
/// `name=value` separated by spaces) but with every control character escaped, in the message
/// and in field values alike: ids, event types and reasons come from the stream, and a raw ESC
/// would drive the terminal or the log viewer (tracing-subscriber escapes only some, and only in
/// the message). JSON logs are escaped by the JSON encoder.
fn escaping_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let escaped = crate::text::Escaped(value);
        match field.name() {
            "message" => write!(w, "{escaped:?}"),
            name => write!(w, "{}={escaped:?}", name.strip_prefix("r#").unwrap_or(name)),
        }
    })
    .delimited(" ")
}

/// Installs the global subscriber. The filter comes from `RUST_LOG` when set, else from
/// `level` (the command line or the config's `log.level`).
pub fn init(format: LogFormat, level: &str) -> anyhow::Result<()> {
    // The HTTP/2 library logs every frame at debug and trace (request paths included): only
    // its warnings, unless the filter names it.
    let quiet_h2 = |filter: &str| {
        if filter.contains("h2") {
            filter.to_string()
        } else {
            format!("{filter},h2=warn")
        }
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => parse_filter(&quiet_h2(&v))
            .map_err(|e| anyhow::anyhow!("RUST_LOG=`{v}` is not a valid log filter: {e}"))?,
        _ => parse_filter(&quiet_h2(level))
            .map_err(|e| anyhow::anyhow!("log level `{level}` is not a valid log filter: {e}"))?,
    };
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(|| ScrubbingStderr);
    let result = match format {
        LogFormat::Human => builder
            .fmt_fields(escaping_fields())
            .with_target(false)
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
