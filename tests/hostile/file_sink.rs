//! See main.rs. The file sink against hostile event types, planted links and foreign files,
//! and `validate` against sink paths that can reach the state database or the config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::support::bridge::{bin, checkpoint, write_file, Bridge, LogLine};
use crate::support::server::{Fault, Options, Server};
use crate::support::wait_for;

/// A server whose first request (no `Last-Event-ID`) gets `stream`, and every later one
/// nothing but heartbeats.
async fn server_sending(stream: String) -> Server {
    Server::start(Options::log(0), move |r| {
        if r.last_event_id.is_none() {
            Fault::Inject {
                after: 0,
                writes: vec![stream.clone().into_bytes()],
            }
        } else {
            Fault::Normal
        }
    })
    .await
}

/// `id: N`, `event: TYPE`, one data line, for each type in order (ids from 1).
fn events_of_types(types: &[&str]) -> String {
    types
        .iter()
        .enumerate()
        .map(|(i, t)| format!("id: {}\nevent: {t}\ndata: {{\"n\":{}}}\n\n", i + 1, i + 1))
        .collect()
}

fn config(d: &Path, feeds: &[(&str, &str)], sink_path: &str) -> PathBuf {
    let routing = "[routing]\ndefault = [\"out\"]\n";
    config_with(
        d,
        feeds,
        &format!(
            "[sink.out]\ntype = \"file\"\npath = \"{sink_path}\"\nfsync = \"never\"\n\n{routing}"
        ),
    )
}

fn config_with(d: &Path, feeds: &[(&str, &str)], sinks_and_routes: &str) -> PathBuf {
    let feeds: String = feeds
        .iter()
        .map(|(name, url)| {
            format!(
                "[[feed]]\nname = \"{name}\"\nurl = \"{url}\"\ndefault_retry = \"100ms\"\n\
                 idle_timeout = \"30s\"\n\n"
            )
        })
        .collect();
    let text = format!(
        "[state]\npath = \"{d}/data/state.db\"\ncommit_interval = \"100ms\"\n\n\
         [shutdown]\ntimeout = \"3s\"\n\n{feeds}{sinks_and_routes}",
        d = d.display()
    );
    write_file(d, "bridge.toml", &text)
}

/// Every file under `dir` not matching `skip`: its length and modification time.
fn snapshot(
    dir: &Path,
    skip: &dyn Fn(&Path) -> bool,
) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("list") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                // A directory's own time changes when the sink creates its files in it.
                todo.push(path.clone());
                out.insert(path, (0, None));
            } else if !skip(&path) {
                out.insert(path, (meta.len(), meta.modified().ok()));
            }
        }
    }
    out
}

fn feed_closed<'a>(logs: &'a [LogLine], feed: &str) -> &'a LogLine {
    logs.iter()
        .find(|l| l.message == "feed closed" && l.feed.as_deref() == Some(feed))
        .unwrap_or_else(|| panic!("no `feed closed` line for {feed}"))
}

/// `sse-bridge validate -c CONFIG`, run in the directory of the config.
fn validate(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .current_dir(config.parent().expect("a directory"))
        .args(["validate", "-c"])
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run sse-bridge validate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_refuses_sink_paths_that_can_reach_the_state_database_or_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let dd = d.display();
    let feeds = [("f", "http://127.0.0.1:9/stream")];
    for (sink_path, expect) in [
        // The reproduced case: no extension, so `event: state.db` named the database.
        (
            format!("{dd}/data/{{type}}"),
            "does not end with a fixed extension",
        ),
        (
            format!("{dd}/data/state.db"),
            "data/state.db (the state database)",
        ),
        (
            format!("{dd}/data/{{type}}.db"),
            "data/state.db (the state database)",
        ),
        (
            format!("{dd}/data/{{type}}.db-wal"),
            "data/state.db-wal (a journal file of the state database)",
        ),
        // Relative to the working directory, the state path being absolute.
        (
            "data/{feed}.db".to_string(),
            "data/state.db (the state database)",
        ),
        (
            format!("{dd}/{{type}}.toml"),
            "bridge.toml (the configuration file)",
        ),
        (
            format!("{dd}/bridge-%Y.toml"),
            "bridge.toml (the configuration file)",
        ),
    ] {
        let config = config(d, &feeds, &sink_path);
        let (code, stderr) = validate(&config);
        assert_ne!(code, Some(0), "{sink_path}: {stderr}");
        assert!(
            stderr.contains("sink.out.path") && stderr.contains(expect),
            "{sink_path}: expected `sink.out.path` and {expect:?} in: {stderr}"
        );
    }
    // The sink in a place of its own, or beside the database with its own extension: fine.
    for sink_path in [
        format!("{dd}/data/{{type}}.jsonl"),
        format!("{dd}/events/{{feed}}/{{type}}.jsonl"),
    ] {
        let config = config(d, &feeds, &sink_path);
        let (code, stderr) = validate(&config);
        assert_eq!(code, Some(0), "{sink_path}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_is_stored_and_nothing_else_is_touched() {
    // The reproduced case: a `{type}` sink as the default route, beside the state database,
    // and event types that name the database, its journal, the config, or that a file name
    // cannot hold as they are.
    let types = [
        "state.db",
        "state.db-wal",
        "state.db-shm",
        "state.db-journal",
        "config.toml",
        "bridge.toml",
        "..",
        ".",
        ".hidden",
        "\u{e9}t\u{e9}",
        "a b",
        "a/b",
        "../../x",
        "%41",
        "A",
        "\u{1b}[31mred",
        "x\\y",
        "message",
        "edit",
        "log.v2",
        "new-item",
    ];
    assert_eq!(types.len(), 21);
    let server = server_sending(events_of_types(&types)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir(d.join("data")).expect("mkdir");
    // Decoys where a careless rendering would write.
    for name in ["data/config.toml", "data/x", "x", "data/.hidden", "data/A"] {
        write_file(d, name, "decoy\n");
    }
    let sink_path = format!("{}/data/{{type}}.jsonl", d.display());
    let config = config(d, &[("f", &server.url())], &sink_path);
    let state = d.join("data/state.db");
    let is_sink_file = |p: &Path| {
        p.parent() == Some(d.join("data").as_path()) && p.extension().is_some_and(|e| e == "jsonl")
    };
    let is_state = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("state.db"))
            && p.parent() == Some(d.join("data").as_path())
    };
    let skip = |p: &Path| is_sink_file(p) || is_state(p);
    let sink_files = || -> Vec<PathBuf> {
        let listed = std::fs::read_dir(d.join("data")).expect("list");
        listed
            .map(|e| e.expect("entry").path())
            .filter(|p| is_sink_file(p) && p.is_file())
            .collect()
    };
    let before = snapshot(d, &skip);

    let bridge = Bridge::spawn(&config);
    let stored = || -> usize {
        sink_files()
            .iter()
            .map(|p| std::fs::read_to_string(p).map_or(0, |t| t.lines().count()))
            .sum()
    };
    let all_in = wait_for(Duration::from_secs(20), || {
        stored() == 21 && checkpoint(&state, "f").is_some_and(|(id, _)| id == "21")
    })
    .await;
    assert!(
        all_in,
        "{} of 21 stored, checkpoint {:?}; log:\n{}",
        stored(),
        checkpoint(&state, "f"),
        bridge.log_text()
    );
    let (status, logs) = bridge.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");

    // Every event exactly once, in the file its encoded type names.
    let mut seen = BTreeMap::new();
    for path in &sink_files() {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a UTF-8 name");
        let decoded = sse_bridge::sink::naming::decode(stem)
            .unwrap_or_else(|| panic!("{} is not an encoded name", path.display()));
        for line in std::fs::read_to_string(path).expect("read").lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert_eq!(v["type"].as_str(), Some(decoded.as_str()), "{line}");
            let id = v["id"].as_str().expect("id").to_string();
            assert!(
                seen.insert(id.clone(), decoded.clone()).is_none(),
                "{id} twice"
            );
        }
    }
    let expected: BTreeMap<String, String> = types
        .iter()
        .enumerate()
        .map(|(i, t)| ((i + 1).to_string(), t.to_string()))
        .collect();
    assert_eq!(seen, expected);
    let closed = feed_closed(&logs, "f");
    assert_eq!(closed.fields["unrouted"], 0, "{:?}", closed.fields);
    assert_eq!(closed.fields["misfit"], 0, "{:?}", closed.fields);
    assert_eq!(checkpoint(&state, "f"), Some(("21".to_string(), 21)));
    let conn = rusqlite::Connection::open(&state).expect("open the state database");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    assert_eq!(
        snapshot(d, &skip),
        before,
        "something outside the sink's files changed"
    );
    eprintln!(
        "after: 21 of 21 events stored under {} files, unrouted 0, misfit 0, state database ok",
        sink_files().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_in_the_sink_tree_are_never_followed_and_the_feeds_are_held_back() {
    let stream = events_of_types(&["message", "message", "message"]);
    let server = server_sending(stream).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let target = outside.path().join("target");
    std::fs::write(&target, "not the sink's\n").expect("write");
    std::fs::create_dir(outside.path().join("dir")).expect("mkdir");
    std::fs::create_dir_all(d.join("out/f")).expect("mkdir");
    let file_link = d.join("out/f/message.jsonl");
    let dir_link = d.join("out/g");
    std::os::unix::fs::symlink(&target, &file_link).expect("symlink");
    std::os::unix::fs::symlink(outside.path().join("dir"), &dir_link).expect("symlink");
    // One sink per feed, so that each one's error shows (a batch stops at its first error).
    let sink_path = format!("{}/out/{{feed}}/{{type}}.jsonl", d.display());
    let url = server.url();
    let sinks: String = ["f", "g"]
        .iter()
        .map(|f| {
            format!(
                "[sink.{f}]\ntype = \"file\"\npath = \"{sink_path}\"\nfsync = \"never\"\n\n\
                 [[route]]\nfeed = \"{f}\"\nsinks = [\"{f}\"]\n\n"
            )
        })
        .collect();
    let config = config_with(d, &[("f", &url), ("g", &url)], &sinks);
    let state = d.join("data/state.db");

    let bridge = Bridge::spawn(&config);
    for link in [&file_link, &dir_link] {
        let shown = link.display().to_string();
        bridge
            .wait_log(
                "an error naming the link",
                Duration::from_secs(20),
                move |l| {
                    l.level == "ERROR"
                        && l.message.contains(&shown)
                        && l.message.contains("symbolic link")
                },
            )
            .await;
    }
    // Held back: a few commit intervals pass without the checkpoints moving.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(checkpoint(&state, "f"), None);
    assert_eq!(checkpoint(&state, "g"), None);
    assert_eq!(std::fs::read(&target).expect("read"), b"not the sink's\n");
    assert_eq!(
        std::fs::read_dir(outside.path().join("dir"))
            .expect("list")
            .count(),
        0
    );

    // Not dropped: once the operator removes the links, the held events are stored.
    std::fs::remove_file(&file_link).expect("rm");
    std::fs::remove_file(&dir_link).expect("rm");
    let done = wait_for(Duration::from_secs(30), || {
        checkpoint(&state, "f").is_some_and(|(id, _)| id == "3")
            && checkpoint(&state, "g").is_some_and(|(id, _)| id == "3")
    })
    .await;
    assert!(done, "log:\n{}", bridge.log_text());
    let (status, _) = bridge.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    for feed in ["f", "g"] {
        let text =
            std::fs::read_to_string(d.join(format!("out/{feed}/message.jsonl"))).expect("read");
        assert_eq!(text.lines().count(), 3, "{feed}: {text}");
    }
    assert_eq!(std::fs::read(&target).expect("read"), b"not the sink's\n");
    assert_eq!(
        std::fs::read_dir(outside.path().join("dir"))
            .expect("list")
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_file_with_an_unfinished_last_line_is_not_cut() {
    let server = server_sending(events_of_types(&["message", "message"])).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir(d.join("out")).expect("mkdir");
    let foreign: &[u8] = b"[server]\nport = 8080\nname = \"unfinished";
    let path = d.join("out/f.jsonl");
    std::fs::write(&path, foreign).expect("write");
    let sink_path = format!("{}/out/{{feed}}.jsonl", d.display());
    let config = config(d, &[("f", &server.url())], &sink_path);
    let state = d.join("data/state.db");

    let bridge = Bridge::spawn(&config);
    let shown = format!("refusing to append to {}", path.display());
    bridge
        .wait_log(
            "the refusal, naming the file",
            Duration::from_secs(20),
            move |l| {
                l.level == "ERROR"
                    && l.message.contains(&shown)
                    && l.message.contains("not a JSON line written by this sink")
            },
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(checkpoint(&state, "f"), None, "the feed is held back");
    let (_, logs) = bridge.terminate(Duration::from_secs(10)).await;
    assert_eq!(std::fs::read(&path).expect("read"), foreign, "not cut");
    assert_eq!(checkpoint(&state, "f"), None);
    assert!(
        !logs
            .iter()
            .any(|l| l.message.contains("cut that unfinished line")),
        "nothing may be cut"
    );
}
