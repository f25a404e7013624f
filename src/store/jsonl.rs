//! The JSON Lines format written by the `file` and `stdout` sinks, and read back by replay;
//! and the one time formatter ([`push_time`], [`format_time`]) every stored `received_at` and
//! SQLite timestamp is written with (RFC 3339, UTC, microseconds, `Z`).
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
///
/// This is the file sink's hot path (README, "Benchmark"): strings are escaped by
/// [`push_str`] and numbers and the time formatted by hand, byte for byte what
/// `serde_json` and `write!` produced before (the tests compare with them).
pub fn encode(event: &Event, out: &mut Vec<u8>) {
    // Keys and punctuation (about 60 bytes), the values, and room for the escapes the data of
    // JSON events usually needs: one reservation instead of several regrowths.
    out.reserve(
        96 + event.feed.len()
            + event.event_type.len()
            + event.id.len()
            + event.data.len()
            + event.data.len() / 8,
    );
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
    push_u64(out, event.seq);
    out.extend_from_slice(b"}\n");
}

/// [`encode`] for a sink that writes many lines: what repeats from one event to the next is
/// kept encoded. Events of a feed share their feed name and, mostly, their type (the same
/// `Arc`s), and the events of one read share their receive time, so the line's start up to
/// `"id":` and the time are encoded once per change rather than once per event. Produces
/// exactly the bytes of [`encode`].
#[derive(Debug, Default)]
pub struct Encoder {
    /// The feed and type the prefix was encoded for.
    key: Option<(Arc<str>, Arc<str>)>,
    /// `{"feed":...,"type":...,"id":`
    prefix: Vec<u8>,
    /// The receive time `time` holds, and its text.
    at: Option<DateTime<Utc>>,
    time: Vec<u8>,
}

impl Encoder {
    /// Appends `event` as one JSON line (ending in `\n`) to `out`.
    pub fn encode(&mut self, event: &Event, out: &mut Vec<u8>) {
        let same = self.key.as_ref().is_some_and(|(feed, event_type)| {
            Arc::ptr_eq(feed, &event.feed) && Arc::ptr_eq(event_type, &event.event_type)
        });
        if !same {
            self.prefix.clear();
            self.prefix.extend_from_slice(b"{\"feed\":");
            push_str(&mut self.prefix, &event.feed);
            self.prefix.extend_from_slice(b",\"type\":");
            push_str(&mut self.prefix, &event.event_type);
            self.prefix.extend_from_slice(b",\"id\":");
            self.key = Some((event.feed.clone(), event.event_type.clone()));
        }
        if self.at != Some(event.received_at) {
            self.time.clear();
            push_time(&mut self.time, event.received_at);
            self.at = Some(event.received_at);
        }
        out.reserve(64 + self.prefix.len() + event.id.len() + event.data.len() * 3 / 2);
        out.extend_from_slice(&self.prefix);
        push_str(out, &event.id);
        out.extend_from_slice(b",\"data\":");
        push_str(out, &event.data);
        out.extend_from_slice(b",\"received_at\":\"");
        out.extend_from_slice(&self.time);
        out.extend_from_slice(b"\",\"seq\":");
        push_u64(out, event.seq);
        out.extend_from_slice(b"}\n");
    }
}

/// `0x7F` and `0x80` in every byte of a word.
const LOWS: u64 = 0x7F7F_7F7F_7F7F_7F7F;
const HIGHS: u64 = 0x8080_8080_8080_8080;
/// A byte value in every byte of a word.
const fn splat(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}

/// Bit 7 set in each byte of `x` that is zero, and only there. Exact: `(x & 0x7F) + 0x7F`
/// never carries into the next byte, unlike the shorter "has a zero byte" trick.
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    !(((x & LOWS) + LOWS) | x) & HIGHS
}

/// Bit 7 set in each byte of `w` that JSON must escape: `"`, `\` and controls below 0x20
/// (exactly the bytes whose top three bits are clear).
#[inline(always)]
fn escape_flags(w: u64) -> u64 {
    zero_bytes(w ^ splat(b'"')) | zero_bytes(w ^ splat(b'\\')) | zero_bytes(w & splat(0xE0))
}

/// For each byte: 0 when it is written as is, else the letter of its escape (`u` for `\u00XX`).
static ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0A] = b'n';
    table[0x0C] = b'f';
    table[0x0D] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Appends `s` as a JSON string literal with exactly `serde_json`'s escapes: `\"`, `\\`,
/// `\b \t \n \f \r`, `\u00xx` (lower-case hex) for other controls below 0x20; everything else,
/// non-ASCII and DEL included, as is.
///
/// This is the file sink's hottest code: JSON data has a quote every few bytes. It works 8
/// bytes at a time (SWAR) on a zero-filled stretch of `out` with a local write index, so no
/// write checks capacity or calls `memcpy`: each word is stored whole; in a word with bytes to
/// escape, each is found with `trailing_zeros`, its escape written over it, and the rest of
/// the word stored again after the escape. `out` is cut back to what was written at the end.
fn push_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    // Short strings with nothing to escape (IDs, names) are copied as they are.
    if bytes.len() <= 32
        && bytes
            .iter()
            .fold(0, |any, &b| any | ESCAPES[usize::from(b)])
            == 0
    {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut at = out.len();
    // Room for the quotes and typical escaping; more is added below if a word needs it.
    out.resize(at + bytes.len() + bytes.len() / 2 + SLACK, 0);
    out[at] = b'"';
    at += 1;
    let mut words = bytes.chunks_exact(8);
    let mut left = bytes.len();
    for chunk in &mut words {
        left -= 8;
        // A word needs at most 8 * 6 bytes, plus the 8 of a whole-word store.
        if at + SLACK > out.len() {
            let more = out.len() + left + left / 2 + SLACK;
            out.resize(more, 0);
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        out[at..at + 8].copy_from_slice(&word);
        let mut flags = escape_flags(w);
        if flags == 0 {
            at += 8;
            continue;
        }
        let mut from = 0u32;
        while flags != 0 {
            let index = flags.trailing_zeros() / 8;
            at += (index - from) as usize;
            at += write_escape(&mut out[at..], word[index as usize]);
            from = index + 1;
            flags &= flags - 1;
            // The bytes after the escape (shifting by 64 would overflow; nothing is left then).
            if from < 8 {
                out[at..at + 8].copy_from_slice(&(w >> (8 * from)).to_le_bytes());
            }
        }
        at += (8 - from) as usize;
    }
    let tail = words.remainder();
    if at + tail.len() * 6 + 1 > out.len() {
        let more = at + tail.len() * 6 + 1;
        out.resize(more, 0);
    }
    for &b in tail {
        if ESCAPES[usize::from(b)] == 0 {
            out[at] = b;
            at += 1;
        } else {
            at += write_escape(&mut out[at..], b);
        }
    }
    out[at] = b'"';
    out.truncate(at + 1);
}

/// Room [`push_str`] keeps ahead of its write index: one word's worst case (8 escapes of 6
/// bytes) plus a whole-word store.
const SLACK: usize = 8 * 6 + 8;

/// Writes the escape of a byte that needs one at the start of `out`; returns its length.
#[inline(always)]
fn write_escape(out: &mut [u8], b: u8) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match ESCAPES[usize::from(b)] {
        b'u' => {
            out[..6].copy_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xF)],
            ]);
            6
        }
        letter => {
            out[..2].copy_from_slice(&[b'\\', letter]);
            2
        }
    }
}

/// Appends `n` in decimal.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `n` as exactly `width` decimal digits (`n < 10^width`).
fn push_padded(out: &mut Vec<u8>, mut n: u32, width: usize) {
    let mut digits = [b'0'; 6];
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits[..width]);
}

/// Appends `t` as `YYYY-MM-DDTHH:MM:SS.ffffffZ`: RFC 3339, UTC, always six fractional digits
/// (nanoseconds truncated), a leap second as second 60. Fixed width, so text order is time
/// order (years 0000 to 9999): the SQLite tables compare these as text.
pub fn push_time(out: &mut Vec<u8>, t: DateTime<Utc>) {
    // The UTC fields directly: `DateTime`'s own accessors convert to local time once each.
    let t = t.naive_utc();
    let nanos = t.nanosecond();
    // chrono represents a leap second as nanoseconds >= 1e9 on second 59.
    let (second, micros) = if nanos >= 1_000_000_000 {
        (60, (nanos - 1_000_000_000) / 1000)
    } else {
        (t.second(), nanos / 1000)
    };
    match u32::try_from(t.year()) {
        Ok(year) if year <= 9999 => push_padded(out, year, 4),
        // Years outside 0..=9999 as `{:04}` writes them (never from a clock, but exact).
        _ => {
            let _ = write!(out, "{:04}", t.year());
        }
    }
    out.push(b'-');
    push_padded(out, t.month(), 2);
    out.push(b'-');
    push_padded(out, t.day(), 2);
    out.push(b'T');
    push_padded(out, t.hour(), 2);
    out.push(b':');
    push_padded(out, t.minute(), 2);
    out.push(b':');
    push_padded(out, second, 2);
    out.push(b'.');
    push_padded(out, micros, 6);
    out.push(b'Z');
}

/// `t` as [`push_time`] writes it.
pub fn format_time(t: DateTime<Utc>) -> String {
    let mut out = Vec::with_capacity(27);
    push_time(&mut out, t);
    // Only ASCII digits and punctuation were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Why a line is not an sse-bridge JSON line. The message never repeats the line (it may be
/// large, or hold secrets); the caller names the file and line number.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or a key is missing or has the wrong type.
    #[error("not an sse-bridge JSON line: {0}")]
    Json(serde_json::Error),
    /// `received_at` is not an RFC 3339 time.
    #[error("`received_at` is not an RFC 3339 timestamp ({text:?}): {error}")]
    Time {
        text: String,
        error: chrono::ParseError,
    },
}

impl DecodeError {
    /// The parser's own error, for a program that wants more than the sentence. (Held rather
    /// than chained as `source()`: the sentence already includes it, and chained it would be
    /// printed twice by `{:#}`.)
    pub fn cause(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            DecodeError::Json(e) => e,
            DecodeError::Time { error, .. } => error,
        }
    }
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
pub fn decode(line: &str) -> Result<Event, DecodeError> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let parsed: Line = serde_json::from_str(line).map_err(DecodeError::Json)?;
    let received_at = match DateTime::parse_from_rfc3339(&parsed.received_at) {
        Ok(t) => t.with_timezone(&Utc),
        Err(error) => {
            return Err(DecodeError::Time {
                text: parsed.received_at,
                error,
            })
        }
    };
    Ok(Event {
        feed: Arc::from(parsed.feed),
        event_type: parsed.event_type.into(),
        data: parsed.data,
        id: parsed.id.into(),
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
            received_at: Utc
                .with_ymd_and_hms(2026, 11, 24, 8, 0, 0)
                .unwrap()
                .checked_add_signed(chrono::Duration::microseconds(123_456))
                .unwrap(),
            ..Event::new(feed, event_type, id, data, seq)
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
            .to_string()
            .contains("not an sse-bridge JSON line"));
        assert!(decode("{\"feed\":\"f\"}")
            .unwrap_err()
            .to_string()
            .contains("missing field"));
        let line = encoded(&event("f", "t", "i", "d", 1));
        let bad_time = line.replace("2026-11-24T08:00:00.123456Z", "yesterday");
        let err = decode(&bad_time).unwrap_err();
        assert!(matches!(err, DecodeError::Time { .. }), "{err:?}");
        assert!(err.to_string().contains("received_at"), "{err}");
        assert!(err.cause().is::<chrono::ParseError>());
        let negative = line.replace("\"seq\":1", "\"seq\":-1");
        assert!(decode(&negative).is_err());
        // Unknown keys are ignored (forward compatibility).
        let extended = line.replace("}\n", ",\"later\":true}\n");
        assert_eq!(decode(&extended).unwrap(), event("f", "t", "i", "d", 1));
    }

    /// What `encode` wrote before it was optimised (serde_json and `write!`): the reference.
    fn reference_encode(event: &Event) -> Vec<u8> {
        let mut out = Vec::new();
        let s = |out: &mut Vec<u8>, v: &str| serde_json::to_writer(&mut *out, v).unwrap();
        out.extend_from_slice(b"{\"feed\":");
        s(&mut out, &event.feed);
        out.extend_from_slice(b",\"type\":");
        s(&mut out, &event.event_type);
        out.extend_from_slice(b",\"id\":");
        s(&mut out, &event.id);
        out.extend_from_slice(b",\"data\":");
        s(&mut out, &event.data);
        out.extend_from_slice(b",\"received_at\":\"");
        let t = event.received_at;
        let nanos = t.nanosecond();
        let (second, micros) = if nanos >= 1_000_000_000 {
            (60, (nanos - 1_000_000_000) / 1000)
        } else {
            (t.second(), nanos / 1000)
        };
        write!(
            out,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            second,
            micros
        )
        .unwrap();
        writeln!(out, "\",\"seq\":{}}}", event.seq).unwrap();
        out
    }

    #[test]
    fn same_bytes_as_serde_json_on_every_escape() {
        // Every byte class at every offset of the 8-byte scan, and runs of specials.
        let specials = [
            "\"", "\\", "\n", "\r", "\t", "\u{8}", "\u{c}", "\u{0}", "\u{1f}", "\u{7f}", "é", "😀",
            "/",
        ];
        for special in specials {
            for pad in 0..18 {
                let a = "x".repeat(pad);
                for data in [
                    format!("{a}{special}"),
                    format!("{special}{a}"),
                    format!("{a}{special}{a}{special}{special}"),
                ] {
                    let e = event("f", &data, &data, &data, pad as u64);
                    assert_eq!(encoded(&e).into_bytes(), reference_encode(&e), "{data:?}");
                }
            }
        }
        let all: String = (0u8..=0x7f).map(char::from).collect();
        let e = event("f", &all, &all, &all, 0);
        assert_eq!(encoded(&e).into_bytes(), reference_encode(&e));
        // Leap seconds and extreme years.
        let mut e = event("f", "t", "", "", u64::MAX);
        e.received_at = Utc.timestamp_opt(1_483_228_799, 1_500_000_000).unwrap();
        assert_eq!(encoded(&e).into_bytes(), reference_encode(&e));
        for micros in [
            i64::MIN / 2,
            -62_135_596_800_000_000,
            253_402_300_800_000_000,
        ] {
            e.received_at = DateTime::from_timestamp_micros(micros).unwrap();
            assert_eq!(encoded(&e).into_bytes(), reference_encode(&e));
        }
    }

    #[test]
    fn encoder_writes_what_encode_writes() {
        let feed: Arc<str> = Arc::from("f\"eed");
        let mut encoder = Encoder::default();
        let mut events = Vec::new();
        for (i, (event_type, id)) in [
            ("a", "1"),
            ("a", "2"),
            ("b\n", "3"),
            ("a", ""),
            ("a", "x\"y"),
        ]
        .into_iter()
        .enumerate()
        {
            let mut e = event("f", event_type, id, "{\"k\":[1,2]}", i as u64);
            e.feed = feed.clone();
            if i >= 3 {
                e.received_at += chrono::Duration::microseconds(1);
            }
            events.push(e);
        }
        // The same Arcs for repeated types, as the parser hands them out.
        events[1].event_type = events[0].event_type.clone();
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for e in &events {
            encode(e, &mut expected);
            encoder.encode(e, &mut got);
        }
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }

    #[test]
    fn format_time_is_the_rfc3339_the_state_store_wrote_before() {
        // Rows written before the formatters were one: text comparisons still hold.
        for micros in [
            0,
            1,
            999_999,
            1_790_000_000_123_456,
            253_402_300_799_999_999,
        ] {
            let t = DateTime::from_timestamp_micros(micros).unwrap();
            assert_eq!(
                format_time(t),
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            );
        }
        assert_eq!(
            format_time(Utc.timestamp_opt(0, 999_999_999).unwrap()),
            "1970-01-01T00:00:00.999999Z"
        );
    }

    proptest! {
        #[test]
        fn format_time_matches_chrono_for_years_0_to_9999(
            micros in -62_167_219_200_000_000i64..253_402_300_800_000_000,
        ) {
            let t = DateTime::from_timestamp_micros(micros).unwrap();
            prop_assert_eq!(
                format_time(t),
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            );
        }

        #[test]
        fn same_bytes_as_serde_json(
            event_type in any::<String>(),
            data in "[\"\\\\\u{0}-\u{1f}a-z{}:,é😀]{0,40}",
            seq in any::<u64>(),
            micros in i64::MIN / 2..i64::MAX / 2,
        ) {
            let mut e = event("feed", &event_type, &data, &data, seq);
            if let Some(t) = DateTime::from_timestamp_micros(micros) {
                e.received_at = t;
            }
            prop_assert_eq!(encoded(&e).into_bytes(), reference_encode(&e));
        }

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
