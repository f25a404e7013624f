//! `sse-bridge status` and `sse-bridge tap`: HTTP clients of a running bridge's admin endpoint.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use reqwest::Url;
use serde_json::Value;

use super::AdminConfig;

/// Finds the admin endpoint: `--admin URL` when given (`host:port` is enough), else the
/// configuration's `[admin] listen` (an unspecified address such as `0.0.0.0` is reached on
/// loopback).
pub fn endpoint(admin: Option<&str>, config: Option<&AdminConfig>) -> Result<Url, String> {
    let text = match (admin, config) {
        (Some(a), _) => {
            if a.contains("://") {
                a.to_string()
            } else {
                format!("http://{a}")
            }
        }
        (None, Some(c)) => {
            let mut addr = c.addr().map_err(|e| format!("key `admin.listen`: {e}"))?;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                });
            }
            format!("http://{addr}")
        }
        (None, None) => return Err(
            "the configuration has no [admin] section, so the bridge runs no admin endpoint: add `[admin]` (and restart the bridge), or pass --admin URL".to_string(),
        ),
    };
    let mut url = Url::parse(&text).map_err(|e| format!("`{text}` is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("`{text}` is not an http:// URL with a host"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Checks a `--feed` or `--type` pattern before connecting (the endpoint checks it too).
pub fn check_glob(pattern: &str) -> Result<(), crate::route::PatternError> {
    crate::route::compile_pattern(pattern).map(|_| ())
}

fn unreachable(base: &Url, e: reqwest::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot reach the admin endpoint at {base}: {} (is `sse-bridge run` running with an [admin] section?)",
        error_chain(&e)
    )
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn get_json(client: &reqwest::Client, base: &Url, path: &str) -> anyhow::Result<Value> {
    let url = base.join(path)?;
    let resp = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| unreachable(base, e))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| unreachable(base, e))?;
    // /readyz answers 503 with a JSON body when not ready.
    if !status.is_success() && status != reqwest::StatusCode::SERVICE_UNAVAILABLE {
        anyhow::bail!(
            "{url} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("{url} did not answer JSON"))
}

/// `sse-bridge status`: the feeds and sinks of the running bridge, as tables (or JSON).
pub fn status(base: &Url, as_json: bool) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .build()?;
        let feeds = get_json(&client, base, "feeds").await?;
        let sinks = get_json(&client, base, "sinks").await?;
        let ready = get_json(&client, base, "readyz").await?;
        if as_json {
            let all = serde_json::json!({ "feeds": feeds, "sinks": sinks, "ready": ready });
            println!("{all}");
            return Ok(());
        }
        let mut out = String::new();
        out.push_str(&feed_table(&feeds));
        out.push('\n');
        out.push_str(&sink_table(&sinks));
        out.push('\n');
        if ready["ready"].as_bool() == Some(true) {
            out.push_str("ready\n");
        } else {
            out.push_str("NOT READY:\n");
            for r in ready["reasons"].as_array().into_iter().flatten() {
                out.push_str(&format!("  - {}\n", r.as_str().unwrap_or_default()));
            }
        }
        // Errors and ids come from the streams: no raw control character reaches the terminal.
        print!("{}", crate::text::escape_controls_keep_newlines(&out));
        Ok(())
    })
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        // A table cell: escaped whole, so that widths count what is shown.
        Value::String(s) => crate::text::escape_controls(s).into_owned(),
        other => other.to_string(),
    }
}

fn seconds(v: &Value) -> Option<Duration> {
    v.as_f64()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs(s.round() as u64))
}

fn shorten(s: String, max: usize) -> String {
    if s.chars().count() <= max {
        return s;
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn feed_table(feeds: &Value) -> String {
    // In a fleet, each feed's owner and lease epoch (ARCHITECTURE.md §9).
    let fleet = feeds
        .as_array()
        .into_iter()
        .flatten()
        .any(|f| !f["owner"].is_null() || !f["epoch"].is_null());
    let rows = feeds
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            let mut row = vec![
                text(&f["name"]),
                text(&f["state"]),
                match (f["protocol"].as_str(), f["connection"].as_u64()) {
                    (Some(p), Some(c)) => format!("{p} #{c}"),
                    (Some(p), None) => p.to_string(),
                    _ => "-".to_string(),
                },
                text(&f["last_event_id"]),
                seconds(&f["last_event_age_seconds"])
                    .map(|d| format!("{} ago", humantime::format_duration(d)))
                    .unwrap_or_else(|| "never".to_string()),
                text(&f["events"]["received"]),
                text(&f["reconnects"]),
                seconds(&f["current_backoff_seconds"])
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_else(|| "-".to_string()),
                text(&f["checkpoint"]["lag_events"]),
                {
                    // Errors name their feed; the row already does.
                    let error = text(&f["last_error"]);
                    let prefix = format!("feed `{}`: ", text(&f["name"]));
                    shorten(
                        error.strip_prefix(&prefix).unwrap_or(&error).to_string(),
                        120,
                    )
                },
            ];
            if fleet {
                let owner = if f["owner"].is_null() {
                    "-".to_string()
                } else {
                    text(&f["owner"])
                };
                row.insert(2, owner);
                row.insert(3, text(&f["epoch"]));
            }
            row
        })
        .collect();
    let mut headers = vec![
        "FEED",
        "STATE",
        "PROTOCOL",
        "LAST-EVENT-ID",
        "LAST EVENT",
        "EVENTS",
        "RECONNECTS",
        "BACKOFF",
        "CKPT LAG",
        "LAST ERROR",
    ];
    if fleet {
        headers.insert(2, "OWNER");
        headers.insert(3, "EPOCH");
    }
    table(&headers, rows)
}

fn sink_table(sinks: &Value) -> String {
    let rows = sinks
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                text(&s["name"]),
                text(&s["type"]),
                if s["healthy"].as_bool() == Some(true) {
                    "yes".to_string()
                } else {
                    "NO".to_string()
                },
                format!("{}/{}", text(&s["queued"]), text(&s["capacity"])),
                text(&s["stored"]),
                text(&s["dropped"]),
                text(&s["write_errors"]),
                shorten(text(&s["last_error"]), 120),
            ]
        })
        .collect();
    table(
        &[
            "SINK",
            "TYPE",
            "HEALTHY",
            "QUEUED",
            "STORED",
            "DROPPED",
            "ERRORS",
            "LAST ERROR",
        ],
        rows,
    )
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let pad = w.saturating_sub(cell.chars().count());
                l.push_str(cell);
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `sse-bridge tap`: prints routed events as they happen until the bridge stops (or the
/// output is closed). JSON Lines as the file sink writes them, or `pretty` for people.
pub fn tap(
    base: &Url,
    feed: Option<&str>,
    event_type: Option<&str>,
    pretty: bool,
) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let mut url = base.join("tap")?;
        if feed.is_some() || event_type.is_some() {
            let mut q = url.query_pairs_mut();
            if let Some(f) = feed {
                q.append_pair("feed", f);
            }
            if let Some(t) = event_type {
                q.append_pair("type", t);
            }
        }
        let resp = client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| unreachable(base, e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!("{url} answered {status}: {}", body.trim());
        }
        let mut body = resp.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        let mut stdout = std::io::stdout();
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|e| anyhow::anyhow!("the tap connection broke: {}", error_chain(&e)))?;
            pending.extend_from_slice(&chunk);
            let Some(end) = pending.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let mut out = Vec::with_capacity(end + 1);
            for line in pending[..end].split(|&b| b == b'\n') {
                print_line(line, pretty, &mut out);
            }
            pending.drain(..=end);
            if let Err(e) = stdout.write_all(&out).and_then(|()| stdout.flush()) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(e.into());
            }
        }
        eprintln!("tap: the bridge closed the connection (it is shutting down)");
        Ok(())
    })
}

/// One line of the tap stream: an event, or a note that events were skipped.
fn print_line(line: &[u8], pretty: bool, out: &mut Vec<u8>) {
    if line.is_empty() {
        return;
    }
    if line.starts_with(b"{\"skipped\":") {
        let n = serde_json::from_slice::<Value>(line)
            .ok()
            .and_then(|v| v["skipped"].as_u64())
            .unwrap_or(0);
        eprintln!(
            "tap: {n} events skipped (this tap read too slowly; the bridge never waits for it)"
        );
        return;
    }
    if !pretty {
        out.extend_from_slice(line);
        out.push(b'\n');
        return;
    }
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        out.extend_from_slice(line);
        out.push(b'\n');
        return;
    };
    let data = v["data"].as_str().unwrap_or_default();
    let field = |k: &str| crate::text::Escaped(v[k].as_str().unwrap_or_default().to_string());
    let _ = writeln!(
        out,
        "{}  {}  {}  id={}  seq={}",
        field("received_at"),
        field("feed"),
        field("type"),
        field("id"),
        v["seq"],
    );
    let body = match serde_json::from_str::<Value>(data) {
        Ok(j @ (Value::Object(_) | Value::Array(_))) => {
            serde_json::to_string_pretty(&j).unwrap_or_else(|_| data.to_string())
        }
        _ => data.to_string(),
    };
    for l in body.lines() {
        let _ = writeln!(out, "    {}", crate::text::Escaped(l));
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_from_flag_or_config() {
        assert_eq!(
            endpoint(Some("127.0.0.1:9"), None).unwrap().as_str(),
            "http://127.0.0.1:9/"
        );
        assert_eq!(
            endpoint(Some("http://h:1/admin"), None).unwrap().as_str(),
            "http://h:1/admin/"
        );
        let c = AdminConfig {
            listen: "0.0.0.0:9187".into(),
            ..AdminConfig::default()
        };
        assert_eq!(
            endpoint(None, Some(&c)).unwrap().as_str(),
            "http://127.0.0.1:9187/"
        );
        let c = AdminConfig {
            listen: "[::]:9187".into(),
            ..AdminConfig::default()
        };
        assert_eq!(
            endpoint(None, Some(&c)).unwrap().as_str(),
            "http://[::1]:9187/"
        );
        assert!(endpoint(None, None).unwrap_err().contains("[admin]"));
        assert!(endpoint(Some("ftp://x"), None).is_err());
    }

    #[test]
    fn pretty_lines() {
        let mut out = Vec::new();
        print_line(
            br#"{"feed":"f","type":"edit","id":"7","data":"{\"a\":1}","received_at":"2026-01-01T00:00:00.000000Z","seq":7}"#,
            true,
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("2026-01-01T00:00:00.000000Z  f  edit  id=7  seq=7\n"),
            "{text}"
        );
        assert!(text.contains("    \"a\": 1\n"), "{text}");
        let mut out = Vec::new();
        print_line(br#"{"skipped":3}"#, false, &mut out);
        assert!(out.is_empty());
    }
}
