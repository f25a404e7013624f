//! Bounded property tests of configuration loading, run by every `cargo test`: the in-tree
//! version of the `config_load` fuzz target (`fuzz/`). Whatever the text, parsing, the error
//! messages and the offline validation never panic, and every problem names a key.

use proptest::prelude::*;

use super::{Config, DEFAULT_CONFIG};

/// A valid configuration that sets nearly every key, to mutate.
const FULL: &str = r#"
[state]
path = "data/state.db"
commit_interval = "500ms"

[log]
level = "info,sse_bridge=debug"
format = "json"

[shutdown]
timeout = "30s"

[[feed]]
name = "wiki"
url = "https://stream.example.org/v2/stream"
headers = { "User-Agent" = "sse-bridge/0.1" }
connect_timeout = "10s"
response_timeout = "30s"
idle_timeout = "0s"
max_event_size = "1 MiB"
max_redirects = 5
policy = "browser"
on_client_error = "stop"
client_error_delay = "60s"
rejected_id_statuses = [400, 409]
default_retry = "3s"
enabled = true

[feed.backoff]
initial = "1s"
max = "60s"
multiplier = 2.0
jitter = 0.3
reset_after = "60s"

[[feed]]
name = "internal"
url = "http://127.0.0.1:8080/events"
max_event_size = 65536
enabled = false

[sink.archive]
type = "file"
path = "data/events/{feed}/{type}.jsonl"
fsync = "interval"
fsync_interval = "1s"
buffer = { max_events = 10000, when_full = "drop_newest" }

[sink.out]
type = "stdout"

[sink.db]
type = "sqlite"
path = "data/state.db"
synchronous = "normal"
busy_timeout = "5s"
batch_max_events = 8192
batch_max_wait = "5ms"

[[route]]
feed = "wiki*"
event = "{edit,log}"
sinks = ["archive", "db"]

[[route]]
event = "heartbeat"
drop = true

[routing]
default = ["out"]
"#;

/// Keys, values and TOML syntax that mutations insert (the fuzz target's dictionary).
const FRAGMENTS: &[&str] = &[
    "state",
    "path",
    "commit_interval",
    "level",
    "format",
    "timeout",
    "name",
    "url",
    "headers",
    "bearer_token_env",
    "bearer_token_file",
    "ca_file",
    "idle_timeout",
    "max_event_size",
    "max_redirects",
    "policy",
    "on_client_error",
    "rejected_id_statuses",
    "default_retry",
    "enabled",
    "backoff",
    "multiplier",
    "jitter",
    "sink",
    "type",
    "fsync",
    "buffer",
    "max_events",
    "when_full",
    "synchronous",
    "batch_max_events",
    "route",
    "event",
    "sinks",
    "drop",
    "routing",
    "default",
    "file",
    "stdout",
    "sqlite",
    "always",
    "never",
    "block",
    "drop_newest",
    "daemon",
    "browser",
    "{feed}",
    "{type}",
    "1 MiB",
    "0s",
    "500ms",
    "99999h",
    "http://",
    "*",
    "..",
    "/",
    "\\u0000",
    "1e308",
    "nan",
    "-inf",
    "-1",
    "0",
    "18446744073709551616",
    "[[feed]]",
    "[sink.x]",
    "[[route]]",
    "[routing]",
    "[admin]",
    " = ",
    "\"",
    "\"\"\"",
    "'",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\n",
    "#",
    "true",
    "false",
    ".",
    "é",
    "\u{FEFF}",
];

/// Loads `text` as the bridge would (minus the file and the environment) and checks that the
/// outcome is well formed. Panics only on a bug.
fn load(text: &str) {
    match Config::from_toml_str(text) {
        Ok(config) => {
            for issue in config.validate() {
                assert!(!issue.key.is_empty(), "an issue without a key: {issue:?}");
                assert!(!issue.message.is_empty(), "an empty message: {issue:?}");
            }
            for sink in config.sink.values() {
                let _ = sink.accepts_type("message");
                let _ = sink.accepts_type("../x");
            }
        }
        Err(e) => {
            assert!(!e.issues.is_empty(), "an error without issues");
            assert!(!e.to_string().is_empty());
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Delete `len` bytes at `at`.
    Delete { at: usize, len: usize },
    /// Insert a fragment at `at`.
    Insert { at: usize, fragment: &'static str },
    /// Repeat the line that holds `at`.
    DuplicateLine { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), prop::sample::select(FRAGMENTS))
            .prop_map(|(at, fragment)| Mutation::Insert { at, fragment }),
        any::<usize>().prop_map(|at| Mutation::DuplicateLine { at }),
    ]
}

/// The char boundary at or before `at % (len + 1)`.
fn boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &mut String, m: &Mutation) {
    match *m {
        Mutation::Delete { at, len } => {
            let start = boundary(text, at);
            let end = boundary(text, start.saturating_add(len).min(text.len()));
            text.replace_range(start..end, "");
        }
        Mutation::Insert { at, fragment } => {
            let at = boundary(text, at);
            text.insert_str(at, fragment);
        }
        Mutation::DuplicateLine { at } => {
            let at = boundary(text, at);
            let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let end = text[at..].find('\n').map_or(text.len(), |i| at + i + 1);
            let line = text[start..end].to_string();
            text.insert_str(end, &line);
        }
    }
}

/// A random TOML value: scalars of every type, arrays and inline tables.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z0-9 ./{}*:_-]{0,12}".prop_map(|s| format!("{s:?}")),
        prop::sample::select(FRAGMENTS).prop_map(|s| format!("{s:?}")),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((prop::sample::select(FRAGMENTS), inner), 0..4).prop_map(|kv| {
                let pairs: Vec<String> = kv.iter().map(|(k, v)| format!("{k:?} = {v}")).collect();
                format!("{{ {} }}", pairs.join(", "))
            }),
        ]
    })
}

/// A random document built from the configuration's own section and key names.
fn random_toml() -> impl Strategy<Value = String> {
    let header = prop::sample::select(vec![
        "",
        "[state]",
        "[log]",
        "[shutdown]",
        "[[feed]]",
        "[feed.backoff]",
        "[sink.a]",
        "[sink.b.buffer]",
        "[[route]]",
        "[routing]",
        "[admin]",
        "[other]",
    ]);
    let key = prop::sample::select(FRAGMENTS);
    prop::collection::vec((header, prop::collection::vec((key, value()), 0..6)), 0..6).prop_map(
        |sections| {
            let mut text = String::new();
            for (header, pairs) in sections {
                text.push_str(header);
                text.push('\n');
                for (k, v) in pairs {
                    text.push_str(&format!("{k:?} = {v}\n"));
                }
            }
            text
        },
    )
}

#[test]
fn the_base_configurations_are_valid() {
    for text in [FULL, DEFAULT_CONFIG] {
        let config = Config::from_toml_str(text).expect("parses");
        assert_eq!(config.validate(), Vec::new());
    }
}

#[test]
fn unicode_log_filters_are_errors_not_panics() {
    // Found by the `config_load` fuzz target: tracing-subscriber sliced these inside a
    // character (see `logging::parse_filter`).
    for level in [
        " é=debug",
        "info, é=debug",
        " \u{1F600}[x]",
        "warn,\tü",
        " é",
    ] {
        let text = format!("[log]\nlevel = {level:?}\n");
        load(&text);
        let config = Config::from_toml_str(&text).expect("parses");
        let _ = config.validate();
        let _ = crate::logging::parse_filter(level);
    }
    // Valid filters stay valid.
    assert!(crate::logging::parse_filter("info,sse_bridge=debug").is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn mutated_valid_configs_never_panic(
        full in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..8),
    ) {
        let mut text = if full { FULL } else { DEFAULT_CONFIG }.to_string();
        for m in &mutations {
            apply(&mut text, m);
        }
        load(&text);
    }

    #[test]
    fn random_toml_never_panics(text in random_toml()) {
        load(&text);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        load(&text);
    }
}
