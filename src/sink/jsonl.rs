//! The JSON Lines format written by the `file` and `stdout` sinks, and read back by replay.
//!
//! # Format
//!
//! Each event is one line: a JSON object followed by a single `\n` (no `\r`). The line is
//! UTF-8 and holds no raw newline, since JSON escapes them inside strings. Keys are always
//! present and always in this order:
//!
//! ```text
//! {"feed":"recentchange","type":"message","id":"1234","data":"{\"x\":1}\nsecond line","received_at":"2026-11-24T08:00:00.123456Z","seq":42}
//! ```
//!
//! | key           | JSON type | meaning |
//! |---------------|-----------|---------|
//! | `feed`        | string    | the configured feed name |
//! | `type`        | string    | the SSE event type; `message` when the stream named none |
//! | `id`          | string    | the stream's last event ID as of this event (may be `""`); it persists across events that carry no `id:` field |
//! | `data`        | string    | the event's data exactly as the SSE standard builds it: the `data:` lines joined by `\n`, without a trailing `\n`. It is a string even when it holds JSON: parse it yourself |
//! | `received_at` | string    | when the bridge parsed the event: RFC 3339, UTC, always 6 fractional digits and `Z` (`2026-11-24T08:00:00.123456Z`) |
//! | `seq`         | integer   | the bridge's per-feed sequence number, increasing by 1 per event of the feed; restarts continue from the checkpoint. After a crash, events since the last checkpoint commit may appear again with the same `feed`, `id` and `seq` |
//!
//! Strings use the JSON escapes `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f` and `\u00XX` for
//! other control characters; everything else (including non-ASCII) is written as UTF-8.
//! Readers should ignore keys they do not know: later versions may append keys after `seq`.
//!
//! Reading the files with common tools:
//!
//! ```text
//! jq -r 'select(.type == "edit") | .data | fromjson | .title' data/events/recentchange.jsonl
//! ```

use std::io::Write;
use std::sync::Arc;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Deserialize;

use crate::event::Event;

/// Appends `event` as one JSON line (ending in `\n`) to `out`. Does not clear `out`.
pub fn encode(event: &Event, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"feed\":");
    push_str(out, &event.feed);
    out.extend_from_slice(b",\"type\":");
    push_str(out, &event.event_type);
    out.extend_from_slice(b",\"id\":");
    push_str(out, &event.id);
    out.extend_from_slice(b",\"data\":");
    push_str(out, &event.data);
    out.extend_from_slice(b",\"received_at\":\"");
    push_time(out, event.received_at);
    out.extend_from_slice(b"\",\"seq\":");
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{}", event.seq);
    out.extend_from_slice(b"}\n");
}

/// Appends `s` as a JSON string literal (quoted and escaped by serde_json).
fn push_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a `str` into a Vec cannot fail: there is no I/O and no fallible value.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends `t` as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn push_time(out: &mut Vec<u8>, t: DateTime<Utc>) {
    let nanos = t.nanosecond();
    // chrono represents a leap second as nanoseconds >= 1e9 on second 59.
    let (second, micros) = if nanos >= 1_000_000_000 {
        (60, (nanos - 1_000_000_000) / 1000)
    } else {
        (t.second(), nanos / 1000)
    };
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        second,
        micros
    );
}

/// The fields of a line as read; unknown keys are ignored.
#[derive(Deserialize)]
struct Line {
    feed: String,
    #[serde(rename = "type")]
    event_type: String,
    id: String,
    data: String,
    received_at: String,
    seq: u64,
}

/// Parses one line written by [`encode`] (a trailing `\n` or `\r\n` is allowed). The error
/// says what is wrong, without repeating the line.
pub fn decode(line: &str) -> Result<Event, String> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let parsed: Line =
        serde_json::from_str(line).map_err(|e| format!("not an sse-bridge JSON line: {e}"))?;
    let received_at = DateTime::parse_from_rfc3339(&parsed.received_at)
        .map_err(|e| {
            format!(
                "`received_at` is not an RFC 3339 timestamp ({:?}): {e}",
                parsed.received_at
            )
        })?
        .with_timezone(&Utc);
    Ok(Event {
        feed: Arc::from(parsed.feed),
        event_type: parsed.event_type,
        data: parsed.data,
        id: parsed.id,
        received_at,
        seq: parsed.seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn event(feed: &str, event_type: &str, id: &str, data: &str, seq: u64) -> Event {
        Event {
            feed: Arc::from(feed),
            event_type: event_type.into(),
            data: data.into(),
            id: id.into(),
            received_at: Utc
                .with_ymd_and_hms(2026, 11, 24, 8, 0, 0)
                .unwrap()
                .checked_add_signed(chrono::Duration::microseconds(123_456))
                .unwrap(),
            seq,
        }
    }

    fn encoded(e: &Event) -> String {
        let mut out = Vec::new();
        encode(e, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn exact_layout() {
        let e = event("recentchange", "message", "abc", "{\"x\":1}", 42);
        assert_eq!(
            encoded(&e),
            "{\"feed\":\"recentchange\",\"type\":\"message\",\"id\":\"abc\",\"data\":\"{\\\"x\\\":1}\",\
             \"received_at\":\"2026-11-24T08:00:00.123456Z\",\"seq\":42}\n"
        );
    }

    #[test]
    fn encode_appends() {
        let mut out = b"prefix".to_vec();
        encode(&event("f", "t", "", "", 1), &mut out);
        encode(&event("f", "t", "", "", 2), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("prefix{"));
        assert_eq!(text.matches('\n').count(), 2);
    }

    #[test]
    fn microseconds_are_always_six_digits() {
        let mut e = event("f", "t", "", "", 1);
        e.received_at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert!(encoded(&e).contains("\"received_at\":\"2026-01-02T03:04:05.000000Z\""));
        // Nanoseconds are truncated to microseconds.
        e.received_at = Utc.timestamp_opt(0, 999_999_999).unwrap();
        assert!(encoded(&e).contains("\"1970-01-01T00:00:00.999999Z\""));
    }

    #[test]
    fn round_trip_with_awkward_strings() {
        let data = "line one\nline two\r\n\ttab \"quoted\" back\\slash \u{0}\u{1}\u{1f}\u{7f} \
                    caf\u{e9} \u{1F600} \u{2028}\u{2029} \u{FFFD}";
        let e = event("feed-1.x_y", "type \"q\"\n", "id\r\n\u{0}", data, u64::MAX);
        let line = encoded(&e);
        assert!(line.ends_with("}\n"));
        assert_eq!(line.matches('\n').count(), 1, "one line only: {line}");
        assert!(!line.contains('\r'));
        assert_eq!(decode(&line).unwrap(), e);
        assert_eq!(decode(line.trim_end()).unwrap(), e);
        assert_eq!(decode(&line.replace("}\n", "}\r\n")).unwrap(), e);
        // Any JSON parser reads it.
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["data"], data);
        assert_eq!(v["seq"], u64::MAX);
    }

    #[test]
    fn key_order_is_fixed() {
        let line = encoded(&event("f", "t", "i", "d", 1));
        let positions: Vec<usize> = [
            "\"feed\"",
            "\"type\"",
            "\"id\"",
            "\"data\"",
            "\"received_at\"",
            "\"seq\"",
        ]
        .iter()
        .map(|k| line.find(k).unwrap())
        .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
    }

    #[test]
    fn decode_errors() {
        assert!(decode("")
            .unwrap_err()
            .contains("not an sse-bridge JSON line"));
        assert!(decode("{\"feed\":\"f\"}")
            .unwrap_err()
            .contains("missing field"));
        let line = encoded(&event("f", "t", "i", "d", 1));
        let bad_time = line.replace("2026-11-24T08:00:00.123456Z", "yesterday");
        assert!(decode(&bad_time).unwrap_err().contains("received_at"));
        let negative = line.replace("\"seq\":1", "\"seq\":-1");
        assert!(decode(&negative).is_err());
        // Unknown keys are ignored (forward compatibility).
        let extended = line.replace("}\n", ",\"later\":true}\n");
        assert_eq!(decode(&extended).unwrap(), event("f", "t", "i", "d", 1));
    }

    proptest! {
        #[test]
        fn round_trip_any_strings(
            feed in "[A-Za-z0-9._-]{1,20}",
            event_type in any::<String>(),
            id in any::<String>(),
            data in any::<String>(),
            seq in any::<u64>(),
            micros in 0i64..4_102_444_800_000_000,
        ) {
            let mut e = event(&feed, &event_type, &id, &data, seq);
            e.received_at = DateTime::from_timestamp_micros(micros).unwrap();
            let line = encoded(&e);
            prop_assert_eq!(line.matches('\n').count(), 1);
            prop_assert_eq!(decode(&line).unwrap(), e);
        }
    }
}
