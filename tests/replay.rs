//! `replay` over what a file sink stored, end to end: the real binary writes 20 000 events from
//! an SSE server on 127.0.0.1 through a file sink that rotates by size and compresses (gzip,
//! zstd), and `replay DIR` / `replay --sink NAME -c CONFIG` must give every event back once, in
//! `seq` order: with one series, with a `{type}` template (several series) and strftime names,
//! with a corrupt compressed file (an error naming it, nothing written), and with `--follow`
//! while the bridge keeps writing and rotating. The replay rate over the compressed series and
//! over one plain file holding the same events is printed (`--nocapture`).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::bridge::{checkpoint, Bridge};
use support::server::Server;
use support::{ok, replay, wait_for, write_file};

const FEED: &str = "wiki";
const N: u64 = 20_000;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    out: PathBuf,
}

/// A bridge config: one feed, the file sink `archive` with `path` (relative to the test's
/// directory `{d}`) rotating at `rotate_size` and compressing with `compress`.
fn setup(url: &str, path: &str, rotate_size: &str, compress: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    let text = format!(
        r#"
[state]
path = "{d}/state.db"
commit_interval = "100ms"

[[feed]]
name = "{FEED}"
url = "{url}"
default_retry = "100ms"

[sink.archive]
type = "file"
path = "{d}/out/{path}"
fsync = "never"
rotate_size = "{rotate_size}"
compress = "{compress}"

[sink.target]
type = "file"
path = "{d}/target/{{feed}}.jsonl"

[[route]]
event = "*"
sinks = ["archive"]
"#,
        d = d.display()
    );
    let config = write_file(&d, "bridge.toml", &text);
    Setup {
        config,
        state: d.join("state.db"),
        out: d.join("out"),
        dir,
    }
}

/// (feed, seq) of each JSON line of `stdout`.
fn seqs(stdout: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            assert_eq!(v["feed"], FEED, "{l}");
            v["seq"].as_u64().expect("seq")
        })
        .collect()
}

fn assert_every_event_once_in_order(got: &[u64], n: u64, what: &str) {
    let want: Vec<u64> = (1..=n).collect();
    if got != want {
        let first_bad = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: {} events, expected {n} in seq order; first difference at index {first_bad}: \
             {:?}",
            got.len(),
            &got[first_bad.saturating_sub(2)..(first_bad + 3).min(got.len())]
        );
    }
}

/// Every file below `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn is_rotated_plain(p: &Path, active: &dyn Fn(&str) -> bool) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".jsonl") && !active(name)
}

/// Runs the bridge until it stored all `n` events and compressed every rotated file.
async fn store_all(s: &Setup, n: u64, active: &dyn Fn(&str) -> bool) {
    let bridge = Bridge::spawn(&s.config);
    let state = s.state.clone();
    let stored = wait_for(Duration::from_secs(120), || {
        checkpoint(&state, FEED).is_some_and(|c| c.1 >= n)
    })
    .await;
    assert!(
        stored,
        "the bridge stored {n} events; log:\n{}",
        bridge.log_text()
    );
    let out = s.out.clone();
    let compressed = wait_for(Duration::from_secs(60), || {
        let f = files(&out);
        !f.iter()
            .any(|p| is_rotated_plain(p, active) || p.to_string_lossy().ends_with(".tmp"))
    })
    .await;
    assert!(
        compressed,
        "every rotated file compressed: {:?}",
        files(&s.out)
    );
    let (status, _) = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "bridge exit {status:?}");
}

/// Rate figures for the closing note: events/s and MB/s (of stored bytes) for one replay.
fn measure(what: &str, args: &[&str], stored_bytes: u64) -> Vec<u8> {
    let started = Instant::now();
    let out = replay(args);
    let took = started.elapsed().as_secs_f64();
    ok(&out);
    let events = out.stdout.iter().filter(|&&b| b == b'\n').count();
    println!(
        "replay rate, {what}: {events} events in {took:.2} s = {:.0} events/s, {:.1} MB/s of \
         stored bytes ({stored_bytes} bytes), {:.1} MB/s of JSON Lines out",
        events as f64 / took,
        stored_bytes as f64 / took / 1e6,
        out.stdout.len() as f64 / took / 1e6
    );
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_compressed_series_replays_every_event_once_in_order() {
    let server = Server::log(N, 500, Duration::from_millis(1)).await;
    for compress in ["gzip", "zstd"] {
        let s = setup(&server.url(), "{feed}.jsonl", "200 KiB", compress);
        store_all(&s, N, &|n| n == "wiki.jsonl").await;
        let all = files(&s.out);
        let suffix = if compress == "gzip" { ".gz" } else { ".zst" };
        let packed = all
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .count();
        assert!(
            packed >= 10,
            "{compress}: about 20 compressed rotated files: {all:?}"
        );
        let out_dir = s.out.to_str().expect("path");
        let cfg = s.config.to_str().expect("path");
        let stored: u64 = all
            .iter()
            .map(|p| std::fs::metadata(p).expect("meta").len())
            .sum();

        let by_dir = measure(
            &format!("{compress} series of {} files", all.len()),
            &[out_dir],
            stored,
        );
        assert_every_event_once_in_order(&seqs(&by_dir), N, &format!("{compress}: replay DIR"));
        let by_sink = ok(&replay(&["--sink", "archive", "-c", cfg]))
            .stdout
            .clone();
        assert_eq!(by_sink, by_dir, "{compress}: --sink gives what DIR gives");
        // The events as the sink stored them, byte for byte.
        let mut original = Vec::new();
        for p in &all {
            let bytes = std::fs::read(p).expect("read");
            let text = match compress {
                "gzip" if p.to_string_lossy().ends_with(".gz") => {
                    let mut t = Vec::new();
                    std::io::Read::read_to_end(
                        &mut flate2::read::MultiGzDecoder::new(&bytes[..]),
                        &mut t,
                    )
                    .expect("gunzip");
                    t
                }
                "zstd" if p.to_string_lossy().ends_with(".zst") => {
                    zstd::stream::decode_all(&bytes[..]).expect("unzstd")
                }
                _ => bytes,
            };
            original.extend(text);
        }
        let mut want: Vec<&[u8]> = original.split_inclusive(|&b| b == b'\n').collect();
        let mut got: Vec<&[u8]> = by_dir.split_inclusive(|&b| b == b'\n').collect();
        want.sort();
        got.sort();
        assert!(got == want, "{compress}: the lines are the stored lines");

        // The same events in one plain file: the rate to compare with.
        let plain = s.dir.path().join("plain.jsonl");
        std::fs::write(&plain, &by_dir).expect("write");
        let again = measure(
            "one plain file",
            &[plain.to_str().expect("path")],
            by_dir.len() as u64,
        );
        assert_eq!(again, by_dir);

        // A file caught mid-compression (the original, a finished copy and a partial one):
        // each event still comes out once, from the original.
        let copy = s.dir.path().join("copy");
        std::fs::create_dir(&copy).expect("mkdir");
        for p in &all {
            std::fs::copy(p, copy.join(p.file_name().expect("name"))).expect("copy");
        }
        let victim = all
            .iter()
            .find(|p| p.to_string_lossy().ends_with(suffix))
            .expect("a compressed file");
        let name = victim.file_name().and_then(|n| n.to_str()).expect("name");
        let original_name = name.strip_suffix(suffix).expect("suffix");
        // `replay FILE` writes the file sink's lines byte for byte: the original, restored.
        let plain_text: Vec<u8> = ok(&replay(&[victim.to_str().expect("path")]))
            .stdout
            .clone();
        assert!(!plain_text.is_empty());
        std::fs::write(copy.join(original_name), &plain_text).expect("write original");
        let bytes = std::fs::read(victim).expect("read");
        std::fs::write(copy.join(format!("{name}.tmp")), &bytes[..bytes.len() / 2])
            .expect("write tmp");
        let copy_dir = copy.to_str().expect("path");
        let out = ok(&replay(&[copy_dir])).stdout.clone();
        assert_every_event_once_in_order(&seqs(&out), N, &format!("{compress}: mid-compression"));

        // One corrupt compressed file: an error naming it, nothing written anywhere.
        std::fs::remove_file(copy.join(original_name)).expect("rm");
        let mut broken = bytes.clone();
        let mid = broken.len() / 2;
        for b in &mut broken[mid..mid + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(copy.join(name), &broken).expect("corrupt");
        for args in [vec![copy_dir], vec![copy_dir, "-c", cfg, "--to", "target"]] {
            let out = replay(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{compress} {args:?}: {err}");
            assert!(err.contains(name), "{compress}: names the file: {err}");
            println!("{compress}, one corrupt file: {}", err.trim());
            assert!(out.stdout.is_empty(), "nothing on stdout");
            assert!(
                !s.dir.path().join("target").exists(),
                "nothing written to the target"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_template_with_strftime_names_replays_in_seq_order() {
    let server = Server::log(N, 500, Duration::from_millis(1)).await;
    let s = setup(
        &server.url(),
        "{feed}/{type}-%Y-%m-%d.jsonl",
        "100 KiB",
        "zstd",
    );
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let active: Box<dyn Fn(&str) -> bool> = Box::new(move |n: &str| {
        ["edit", "log", "new"]
            .iter()
            .any(|t| n == format!("{t}-{today}.jsonl"))
    });
    store_all(&s, N, &*active).await;
    let all = files(&s.out);
    for t in ["edit", "log", "new"] {
        assert!(
            all.iter()
                .filter(|p| p.to_string_lossy().contains(&format!("/{t}-")))
                .count()
                >= 3,
            "several files per type: {all:?}"
        );
    }
    let out_dir = s.out.to_str().expect("path");
    let cfg = s.config.to_str().expect("path");
    let by_dir = ok(&replay(&[out_dir])).stdout.clone();
    assert_every_event_once_in_order(&seqs(&by_dir), N, "{type} series: replay DIR");
    let by_sink = ok(&replay(&["--sink", "archive", "-c", cfg]))
        .stdout
        .clone();
    assert_eq!(by_sink, by_dir, "--sink gives what DIR gives");
    // Filters apply across the series.
    let edits = replay(&[
        "--sink",
        "archive",
        "-c",
        cfg,
        "--type",
        "edit",
        "--after-seq",
        "100",
    ]);
    let got = seqs(&ok(&edits).stdout);
    let want: Vec<u64> = (101..=N).filter(|n| n % 3 == 0).collect();
    assert_eq!(got, want, "--type edit --after-seq 100 across the series");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_reads_across_rotations_while_the_bridge_writes() {
    const M: u64 = 3000;
    // About 170 bytes an event, 40 events every 25 ms: a 64 KiB file fills in ~0.25 s, so
    // there are about eight rotations while the replay follows.
    let server = Server::log(M, 40, Duration::from_millis(25)).await;
    let s = setup(&server.url(), "{feed}.jsonl", "64 KiB", "gzip");
    let bridge = Bridge::spawn(&s.config);
    let active = s.out.join("wiki.jsonl");
    assert!(
        wait_for(Duration::from_secs(30), || active.exists()).await,
        "the sink's file appears; log:\n{}",
        bridge.log_text()
    );
    let rotated_at_start = files(&s.out).len() - 1;
    let mut child = Command::new(support::bin())
        .args(["replay", "--follow", "--sink", "archive", "-c"])
        .arg(&s.config)
        .env_remove("SSE_BRIDGE_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn replay --follow");
    let stdout = child.stdout.take().expect("stdout");
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            sink.lock().expect("lock").push(line);
        }
    });
    let state = s.state.clone();
    assert!(
        wait_for(Duration::from_secs(120), || {
            checkpoint(&state, FEED).is_some_and(|c| c.1 >= M)
        })
        .await,
        "the bridge stored {M} events; log:\n{}",
        bridge.log_text()
    );
    let got_all = wait_for(Duration::from_secs(30), || {
        lines.lock().expect("lock").len() as u64 >= M
    })
    .await;
    let rotations = files(&s.out).len() - 1 - rotated_at_start;
    // SIGTERM ends following with exit 0.
    // SAFETY: kill(2) on our own child, not yet reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().expect("wait");
    let _ = reader.join();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(got_all, "all {M} events followed; stderr: {err}");
    assert!(status.success(), "replay --follow exit {status:?}: {err}");
    assert!(
        rotations >= 2,
        "at least two rotations while following ({rotations})"
    );
    let text = lines.lock().expect("lock").join("\n");
    assert_every_event_once_in_order(&seqs(text.as_bytes()), M, "--follow");
    let (status, _) = bridge.terminate(Duration::from_secs(20)).await;
    assert!(status.success());
}
