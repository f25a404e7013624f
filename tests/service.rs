//! Running as a service: SIGHUP reload with real connections, and the systemd notification
//! protocol on a real datagram socket. The real binary, real signals.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::server::Server;
use support::{archive_sink, bin, state_section, wait_for, write_file};

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

fn feed(name: &str, url: &str, extra: &str) -> String {
    format!("[[feed]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n")
}

fn config(dir: &Path, feeds: &str) -> String {
    let archive = archive_sink(dir);
    let state = state_section(dir, "100ms");
    format!(
        r#"
{state}

[shutdown]
timeout = "10s"

{feeds}

{archive}

[routing]
default = ["archive"]
"#,
    )
}

fn lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

async fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let end = std::time::Instant::now() + within;
    while std::time::Instant::now() < end {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    panic!("the bridge did not exit within {within:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_unchanged_feeds_connected_and_applies_the_rest() {
    // Each server sends 50 events, then heartbeats on the open connection.
    let keep = Server::log(50, 50, Duration::from_millis(1)).await;
    let change = Server::log(50, 50, Duration::from_millis(1)).await;
    let remove = Server::log(50, 50, Duration::from_millis(1)).await;
    let add = Server::log(50, 50, Duration::from_millis(1)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let before = config(
        d,
        &[
            feed("keep", &keep.url(), ""),
            feed("change", &change.url(), "idle_timeout = \"30s\""),
            feed("remove", &remove.url(), ""),
        ]
        .concat(),
    );
    let path = write_file(d, "bridge.toml", &before);
    let log = std::fs::File::create(d.join("bridge.log")).expect("log");
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    for name in ["keep", "change", "remove"] {
        let file = d.join(format!("events/{name}.jsonl"));
        assert!(
            wait_for(Duration::from_secs(20), || lines(&file) == 50).await,
            "{name}: {} events stored",
            lines(&file)
        );
    }
    assert_eq!(keep.requests().len(), 1);

    // A broken configuration is rejected and changes nothing.
    write_file(
        d,
        "bridge.toml",
        &before.replace("[sink.archive]", "[sink.archive]\nbogus = 1"),
    );
    signal(&child, "-HUP");
    let logged = || std::fs::read_to_string(d.join("bridge.log")).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(10), || logged()
            .contains("reload rejected"))
        .await,
        "rejection logged:\n{}",
        logged()
    );
    assert!(
        logged().contains("bogus"),
        "the rejection names the key:\n{}",
        logged()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (name, server) in [("keep", &keep), ("change", &change), ("remove", &remove)] {
        assert_eq!(
            server.requests().len(),
            1,
            "{name} untouched by a rejected reload"
        );
        assert_eq!(server.open_connections(), 1, "{name} still connected");
    }
    assert!(child.try_wait().expect("wait").is_none(), "still running");

    // The real change: keep as is, change one option, remove one, add one.
    let after = config(
        d,
        &[
            feed("keep", &keep.url(), ""),
            feed("change", &change.url(), "idle_timeout = \"45s\""),
            feed("added", &add.url(), ""),
        ]
        .concat(),
    );
    write_file(d, "bridge.toml", &after);
    signal(&child, "-HUP");
    let added = d.join("events/added.jsonl");
    assert!(
        wait_for(Duration::from_secs(20), || lines(&added) == 50).await,
        "added feed started: {} events\n{}",
        lines(&added),
        logged()
    );
    assert!(
        wait_for(Duration::from_secs(20), || change.requests().len() == 2).await,
        "changed feed reconnected"
    );
    assert!(
        wait_for(Duration::from_secs(5), || remove.open_connections() == 0).await,
        "removed feed disconnected"
    );
    let change_requests = change.requests();
    assert_eq!(
        change_requests[1].last_event_id.as_deref(),
        Some("50"),
        "the changed feed drained, committed and resumed from its checkpoint"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        keep.requests().len(),
        1,
        "the unchanged feed kept its connection"
    );
    assert_eq!(keep.open_connections(), 1);
    assert_eq!(
        remove.requests().len(),
        1,
        "the removed feed did not reconnect"
    );
    assert_eq!(
        lines(&d.join("events/change.jsonl")),
        50,
        "no duplicates for the changed feed"
    );

    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(15)).await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_arrive_in_order() {
    let server = Server::log(10, 10, Duration::from_millis(1)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let path = write_file(
        d,
        "bridge.toml",
        &config(d, &feed("one", &server.url(), "")),
    );
    let socket_path = d.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut messages: Vec<String> = Vec::new();
    let receive_until = |messages: &mut Vec<String>, what: &str, within: Duration| {
        let end = std::time::Instant::now() + within;
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < end {
            if let Ok(n) = socket.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                if messages.last().is_some_and(|m| m.starts_with(what)) {
                    return true;
                }
            }
        }
        false
    };
    assert!(
        receive_until(&mut messages, "READY=1", Duration::from_secs(10)),
        "{messages:?}"
    );
    assert!(
        receive_until(&mut messages, "STATUS=", Duration::from_secs(10)),
        "{messages:?}"
    );
    assert!(
        receive_until(&mut messages, "WATCHDOG=1", Duration::from_secs(5)),
        "{messages:?}"
    );
    signal(&child, "-HUP");
    assert!(
        receive_until(&mut messages, "RELOADING=1", Duration::from_secs(10)),
        "{messages:?}"
    );
    assert!(
        receive_until(&mut messages, "READY=1", Duration::from_secs(10)),
        "{messages:?}"
    );
    signal(&child, "-TERM");
    assert!(
        receive_until(&mut messages, "STOPPING=1", Duration::from_secs(10)),
        "{messages:?}"
    );
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(15)).await,
        Some(0)
    );

    let first = |prefix: &str| messages.iter().position(|m| m.starts_with(prefix));
    let ready = first("READY=1").expect("ready");
    let status = first("STATUS=").expect("status");
    let reloading = first("RELOADING=1").expect("reloading");
    let stopping = first("STOPPING=1").expect("stopping");
    assert!(
        ready < status && status < reloading && reloading < stopping,
        "{messages:?}"
    );
    assert!(
        messages[reloading].contains("MONOTONIC_USEC="),
        "RELOADING carries MONOTONIC_USEC: {messages:?}"
    );
    assert!(
        messages[reloading..stopping].iter().any(|m| m == "READY=1"),
        "READY again after the reload: {messages:?}"
    );
    let status_line = &messages[status];
    assert!(status_line.contains("feeds open"), "{status_line}");
    let pets = messages.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pets >= 1, "{messages:?}");
}

/// The shipped unit parses, names executables that exist, and stays well hardened
/// (`systemd-analyze security` exposure of 2.0 or less). Runs where systemd-analyze exists.
#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed: unit not checked");
        return;
    };
    assert!(out.status.success());
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/sse-bridge.service"
    ))
    .expect("unit file");
    for key in [
        "Type=notify",
        "ExecStartPre=",
        "ExecReload=",
        "WatchdogSec=",
        "StateDirectory=",
        "ConfigurationDirectory=",
        "User=sse-bridge",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(unit.contains(key), "unit lacks {key:?}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("sse-bridge.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/sse-bridge", &bin().display().to_string()),
    )
    .expect("write unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze verify");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    assert!(
        security.status.success(),
        "exposure above 2.0:\n{text}{}",
        String::from_utf8_lossy(&security.stderr)
    );
}

/// logrotate's way: rename the file, send SIGHUP; the file sink reopens the original path and
/// no event is lost or written twice across the two files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_files_after_an_external_rename() {
    let server = Server::log(400, 10, Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let path = write_file(
        d,
        "bridge.toml",
        &config(d, &feed("rot", &server.url(), "")),
    );
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let live = d.join("events/rot.jsonl");
    let rotated = d.join("events/rot.jsonl.1");
    assert!(wait_for(Duration::from_secs(20), || lines(&live) >= 50).await);
    std::fs::rename(&live, &rotated).expect("rename like logrotate");
    signal(&child, "-HUP");
    assert!(
        wait_for(Duration::from_secs(30), || lines(&rotated) + lines(&live)
            == 400)
        .await,
        "{} + {} lines",
        lines(&rotated),
        lines(&live)
    );
    assert!(
        lines(&live) > 0,
        "writing continued in a new file at the original path"
    );
    signal(&child, "-TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(15)).await,
        Some(0)
    );
    let mut seqs: Vec<u64> = [&rotated, &live]
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .expect("read")
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).expect("whole JSON line");
                    v["seq"].as_u64().expect("seq")
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let in_order = seqs.windows(2).all(|w| w[0] < w[1]);
    seqs.dedup();
    assert!(
        in_order,
        "the rotated file holds the first events, the new one the rest"
    );
    assert_eq!(seqs, (1..=400).collect::<Vec<u64>>());
}
