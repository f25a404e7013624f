//! The real `sse-bridge` binary as a child process, for tests that judge it from outside: its
//! JSON logs (parsed live from standard error), its JSON Lines output, its state database, its
//! memory high-water mark, and real signals (SIGTERM drains, SIGKILL crashes).
//!
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One line of the bridge's `--log-format json` output.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// `TRACE` .. `ERROR`.
    pub level: String,
    /// The `message` field.
    pub message: String,
    /// The `feed` field, when the line is about a feed.
    pub feed: Option<String>,
    /// Every field (message included) as logged.
    pub fields: serde_json::Value,
    /// When the test read the line.
    pub at: Instant,
    /// The line as written.
    pub raw: String,
}

impl LogLine {
    fn parse(line: &str) -> LogLine {
        let at = Instant::now();
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => {
                let fields = v["fields"].clone();
                LogLine {
                    level: v["level"].as_str().unwrap_or_default().to_string(),
                    message: fields["message"].as_str().unwrap_or_default().to_string(),
                    feed: fields["feed"].as_str().map(str::to_string),
                    fields,
                    at,
                    raw: line.to_string(),
                }
            }
            // Not JSON: a panic message or the like. Kept, so that tests can report it.
            Err(_) => LogLine {
                level: "RAW".into(),
                message: line.to_string(),
                feed: None,
                fields: serde_json::Value::Null,
                at,
                raw: line.to_string(),
            },
        }
    }

    /// `level message` for failure reports.
    pub fn show(&self) -> String {
        format!("{} {}", self.level, self.message)
    }
}

/// The state of a feed as its log lines tell it (the EventSource `readyState`, ARCHITECTURE.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// "connected to …": the response was accepted (`open`).
    Open,
    /// A failure followed by "reconnecting in …" / "retrying in …" (`connecting`).
    Connecting,
    /// "… the feed is stopped until restarted" (`stopped`).
    Stopped,
    /// "feed closed": drained at shutdown (`closed`).
    Closed,
}

impl Seen {
    /// The state transition a log line announces, if any.
    pub fn of(line: &LogLine) -> Option<Seen> {
        let m = &line.message;
        if m.starts_with("connected to ") {
            Some(Seen::Open)
        } else if m.contains("; reconnecting in ") || m.contains("; retrying in ") {
            Some(Seen::Connecting)
        } else if m.ends_with("the feed is stopped until restarted") {
            Some(Seen::Stopped)
        } else if m == "feed closed" {
            Some(Seen::Closed)
        } else {
            None
        }
    }
}

/// The states of `feed` in the order its log lines announced them, repeats collapsed.
pub fn states(logs: &[LogLine], feed: &str) -> Vec<Seen> {
    let mut out: Vec<Seen> = Vec::new();
    for line in logs.iter().filter(|l| l.feed.as_deref() == Some(feed)) {
        if let Some(s) = Seen::of(line) {
            if out.last() != Some(&s) {
                out.push(s);
            }
        }
    }
    out
}

#[derive(Default)]
struct Logs {
    lines: Vec<LogLine>,
    /// Standard error reached its end (the process exited).
    ended: bool,
}

/// The first `n` lines `pred` accepts, waiting at most `within` (`None`: they did not come, or
/// the process exited first).
fn find_lines(
    logs: &(Mutex<Logs>, Condvar),
    within: Duration,
    n: usize,
    pred: impl Fn(&LogLine) -> bool,
) -> Option<Vec<LogLine>> {
    let deadline = Instant::now() + within;
    let (lock, cv) = logs;
    let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let matching: Vec<LogLine> = guard
            .lines
            .iter()
            .filter(|l| pred(l))
            .take(n)
            .cloned()
            .collect();
        if matching.len() >= n {
            return Some(matching);
        }
        let now = Instant::now();
        if now >= deadline || guard.ended {
            return None;
        }
        guard = cv
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// A running bridge.
pub struct Bridge {
    child: Child,
    logs: Arc<(Mutex<Logs>, Condvar)>,
    reader: Option<JoinHandle<()>>,
    pub config: PathBuf,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // A failed test must not leave a bridge running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment variables the stream transport takes proxies from.
const PROXY_VARIABLES: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// The real binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sse-bridge"))
}

impl Bridge {
    /// `sse-bridge run --log-format json -c CONFIG`, logs at `info` (standard output, where a
    /// `stdout` sink would write, is discarded).
    pub fn spawn(config: &Path) -> Bridge {
        Bridge::spawn_with_log_level(config, "info")
    }

    pub fn spawn_with_log_level(config: &Path, level: &str) -> Bridge {
        Bridge::spawn_with_env(config, level, &[])
    }

    /// With extra environment variables. The proxy variables of the test's own environment
    /// are removed (the feeds are on 127.0.0.1), unless `env` sets them.
    pub fn spawn_with_env(config: &Path, level: &str, env: &[(&str, &str)]) -> Bridge {
        let mut command = Bridge::command(&["run", "--log-format", "json", "-c"]);
        command
            .arg(config)
            .env("RUST_LOG", level)
            .envs(env.iter().copied());
        Bridge::spawn_command(command, config)
    }

    /// `sse-bridge run -c CONFIG` with the human log format (each line a [`LogLine`] of level
    /// `RAW`; [`Bridge::raw_log`] is the text as written), logs at `info`.
    pub fn spawn_plain(config: &Path) -> Bridge {
        let mut command = Bridge::command(&["run", "-c"]);
        command.arg(config).env("RUST_LOG", "info");
        Bridge::spawn_command(command, config)
    }

    /// The binary with `args`, without the proxy variables of the test's own environment (the
    /// feeds are on 127.0.0.1), `SSE_BRIDGE_CONFIG` or systemd's `NOTIFY_SOCKET`.
    pub fn command(args: &[&str]) -> Command {
        let mut command = Command::new(bin());
        command
            .args(args)
            .env_remove("SSE_BRIDGE_CONFIG")
            .env_remove("NOTIFY_SOCKET");
        command
    }

    /// Runs `command` (see [`Bridge::command`]), reading its standard error as it comes,
    /// without the proxy variables of the test's own environment unless `command` sets them.
    pub fn spawn_command(mut command: Command, config: &Path) -> Bridge {
        for var in PROXY_VARIABLES {
            if !command.get_envs().any(|(name, _)| name == var) {
                command.env_remove(var);
            }
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sse-bridge");
        let stderr = child.stderr.take().expect("stderr");
        let logs: Arc<(Mutex<Logs>, Condvar)> = Arc::default();
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        let line = LogLine::parse(text.trim_end());
                        let (lock, cv) = &*sink;
                        lock.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .lines
                            .push(line);
                        cv.notify_all();
                    }
                }
            }
            let (lock, cv) = &*sink;
            lock.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
            cv.notify_all();
        });
        Bridge {
            child,
            logs,
            reader: Some(reader),
            config: config.to_path_buf(),
        }
    }

    /// Sends `signal` (`libc::SIGHUP`, …) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({signal})");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<LogLine> {
        self.logs
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .clone()
    }

    /// The log so far as written.
    pub fn raw_log(&self) -> String {
        self.logs()
            .iter()
            .map(|l| l.raw.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The log so far, one line per entry, for failure messages.
    pub fn log_text(&self) -> String {
        self.logs()
            .iter()
            .map(LogLine::show)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits (at most `within`) until `pred` holds for some log line and returns that line;
    /// panics with the log when it does not come. The wait runs on a blocking thread, so the
    /// test's servers keep running on the runtime meanwhile.
    pub async fn wait_log(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&LogLine) -> bool + Send + 'static,
    ) -> LogLine {
        let mut lines = self.wait_logs(what, within, 1, pred).await;
        lines.swap_remove(0)
    }

    /// Waits (at most `within`) for a log line whose message contains `text`.
    pub async fn wait_message(&self, within: Duration, text: &str) -> LogLine {
        let wanted = text.to_string();
        self.wait_log(text, within, move |l| l.message.contains(&wanted))
            .await
    }

    /// Like [`Bridge::wait_log`], until `n` lines satisfy `pred`; returns the first `n`.
    pub async fn wait_logs(
        &self,
        what: &str,
        within: Duration,
        n: usize,
        pred: impl Fn(&LogLine) -> bool + Send + 'static,
    ) -> Vec<LogLine> {
        let logs = self.logs.clone();
        let found = tokio::task::spawn_blocking(move || find_lines(&logs, within, n, pred))
            .await
            .expect("log waiter");
        found.unwrap_or_else(|| self.no_log_line(what, within, n))
    }

    /// [`Bridge::wait_log`] for a test that runs no runtime: blocks this thread.
    pub fn wait_log_blocking(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> LogLine {
        match find_lines(&self.logs, within, 1, pred) {
            Some(mut lines) => lines.swap_remove(0),
            None => self.no_log_line(what, within, 1),
        }
    }

    fn no_log_line(&self, what: &str, within: Duration, n: usize) -> ! {
        panic!(
            "waited {within:?} for {n} log line(s): {what}; the log:\n{}",
            self.log_text()
        )
    }

    /// Open file descriptors of the process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The peak resident set size of the process so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        status_bytes(self.pid(), "VmHWM:")
    }

    /// The resident set size of the process now (`VmRSS`), in bytes.
    pub fn rss(&self) -> Option<u64> {
        rss(self.pid())
    }

    /// User plus system CPU time of the process so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Panics (with the log) if the process has exited.
    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.finish_reader();
            panic!(
                "sse-bridge exited early ({status}); its log:\n{}",
                self.raw_log()
            );
        }
    }

    /// SIGTERM, then the exit code (panics with the log when there is no exit within
    /// `within`). The log stays readable.
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        self.stop(within).await.code()
    }

    /// SIGTERM, then waits (polling, at most `within`) for the exit; returns its status and the
    /// complete log.
    pub async fn terminate(mut self, within: Duration) -> (ExitStatus, Vec<LogLine>) {
        let status = self.stop(within).await;
        (status, self.logs())
    }

    /// SIGTERM, then waits (polling, at most `within`) for the exit and the end of the log.
    pub async fn stop(&mut self, within: Duration) -> ExitStatus {
        // SAFETY: kill(2) with the pid of our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM");
        let end = Instant::now() + within;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= end {
                panic!(
                    "the bridge did not exit within {within:?} of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.finish_reader();
        status
    }

    /// SIGKILL (kill -9) and reap; returns the log up to the kill.
    pub fn kill9(mut self) -> Vec<LogLine> {
        self.kill();
        self.logs()
    }

    /// SIGKILL (kill -9) and reap; the log stays readable.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
        self.finish_reader();
    }

    fn finish_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// User plus system CPU time of process `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// The resident set size of process `pid` now (`VmRSS`), in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS:")
}

/// A `kB` field of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let kib = l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim();
        kib.parse::<u64>().ok().map(|k| k * 1024)
    })
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

/// A feed's committed checkpoint in a state database: `(last_event_id, seq)`.
pub fn checkpoint(state: &Path, feed: &str) -> Option<(String, u64)> {
    let conn = rusqlite::Connection::open_with_flags(
        state,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    conn.query_row(
        "SELECT last_event_id, seq FROM checkpoints WHERE feed = ?1",
        [feed],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
    )
    .ok()
}

/// One stored JSON Lines event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub feed: String,
    pub event_type: String,
    pub id: String,
    pub data: String,
    pub received_at: String,
    pub seq: u64,
}

/// Parses one JSON Lines record; panics (naming the line) on anything malformed.
pub fn parse_line(line: &str, what: &str) -> Stored {
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {line:?}"));
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{what}: no string `{k}` in {line:?}"))
            .to_string()
    };
    Stored {
        feed: s("feed"),
        event_type: s("type"),
        id: s("id"),
        data: s("data"),
        received_at: s("received_at"),
        seq: v["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no integer `seq` in {line:?}")),
    }
}

/// Every event of a JSON Lines file (none if it does not exist). Every line must be whole.
pub fn read_jsonl(path: &Path) -> Vec<Stored> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    if !bytes.is_empty() {
        assert_eq!(
            bytes.last(),
            Some(&b'\n'),
            "{} ends with a torn line",
            path.display()
        );
    }
    let text =
        String::from_utf8(bytes).unwrap_or_else(|e| panic!("{} is not UTF-8: {e}", path.display()));
    text.lines()
        .enumerate()
        .map(|(i, l)| parse_line(l, &format!("{} line {}", path.display(), i + 1)))
        .collect()
}

/// Number of complete lines in a file (0 if it does not exist).
pub fn line_count(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

/// Reads a growing JSON Lines file incrementally: each call returns the whole lines appended
/// since the previous call (a trailing partial line is left for the next call).
///
/// A writer that repairs a torn last line (cuts it, then appends) invalidates the partial line
/// read so far: read only while no writer runs, and call [`Tail::rewind_partial`] before reading
/// what the next writer appended.
pub struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    pub fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Bytes of an unfinished last line seen so far.
    pub fn partial(&self) -> &[u8] {
        &self.partial
    }

    /// Forgets the unfinished last line read so far: the next read starts where it started.
    pub fn rewind_partial(&mut self) {
        self.offset -= self.partial.len() as u64;
        self.partial.clear();
    }

    /// The complete lines appended since the last call.
    pub fn read_new(&mut self) -> Vec<Vec<u8>> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        self.offset += buf.len() as u64;
        let mut data = std::mem::take(&mut self.partial);
        data.extend_from_slice(&buf);
        let mut lines = Vec::new();
        let mut start = 0;
        for (i, &b) in data.iter().enumerate() {
            if b == b'\n' {
                lines.push(data[start..i].to_vec());
                start = i + 1;
            }
        }
        self.partial = data[start..].to_vec();
        lines
    }
}
