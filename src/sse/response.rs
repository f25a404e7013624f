//! What a response means for the client (ARCHITECTURE.md §3), decided from its status and
//! headers alone: open the stream (200 with `text/event-stream`, no coding the bridge would
//! have to decode), stop (204), retry later (5xx, 408, 429 with `Retry-After`), the ID was
//! rejected, or a client error. Pure: no I/O, no clock but `Retry-After`'s date.

use std::time::{Duration, SystemTime};

use http::header::{
    HeaderMap, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER, TRANSFER_ENCODING,
};
use http::StatusCode;

use super::connection::FailureKind;
use super::retry::parse_retry_after;

/// The media type of an event stream.
pub const EVENT_STREAM: &str = "text/event-stream";

/// What to do with a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Read the stream.
    Open,
    /// Do not: `what` says why (for a message naming the feed and URL).
    Fail {
        kind: FailureKind,
        what: String,
        /// The server's `Retry-After`, with a 5xx, 408 or 429.
        retry_after: Option<Duration>,
    },
}

/// Classifies a response. `redirected_to`: the URL that answered, when redirects led there;
/// `id_rejected`: the request carried `Last-Event-ID` and the status is one the feed lists in
/// `rejected_id_statuses`; `scrub` removes secrets from server text before it is shortened
/// (which could cut a secret in two).
pub fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    redirected_to: Option<&str>,
    id_rejected: bool,
    scrub: impl Fn(&str) -> String,
) -> Verdict {
    classify_accepting(status, headers, redirected_to, id_rejected, false, scrub)
}

/// [`classify`] for a request that sent `Accept-Encoding: gzip` when `gzip` is set: a 200
/// whose only coding is gzip ([`is_gzip_encoded`]) opens too, and the caller decodes it.
pub fn classify_accepting(
    status: StatusCode,
    headers: &HeaderMap,
    redirected_to: Option<&str>,
    id_rejected: bool,
    gzip: bool,
    scrub: impl Fn(&str) -> String,
) -> Verdict {
    let code = status.as_u16();
    let via = match redirected_to {
        Some(url) => format!(" (redirected to {url})"),
        None => String::new(),
    };
    let answer = match status.canonical_reason() {
        Some(reason) => format!("HTTP {code} {reason}{via}"),
        None => format!("HTTP {code}{via}"),
    };
    let fail = |kind, what: String| Verdict::Fail {
        kind,
        what,
        retry_after: None,
    };
    let text = |name| {
        headers
            .get(name)
            .map(|v: &HeaderValue| v.to_str().ok().map(str::trim))
    };

    if status == StatusCode::OK {
        if let Some(problem) = unreadable_coding(headers, gzip) {
            // Not a client error: a proxy or server may stop compressing; retried with backoff.
            let asked = if gzip {
                "it asks for gzip only"
            } else {
                "it sends no Accept-Encoding"
            };
            return fail(
                FailureKind::Network,
                format!("{answer} with {problem}, which the bridge does not decode ({asked}); dropping the response"),
            );
        }
        return match text(CONTENT_TYPE) {
            Some(Some(v)) if is_event_stream(v) => Verdict::Open,
            Some(v) => fail(
                FailureKind::Client,
                format!(
                    "{answer} with Content-Type `{}`, not {EVENT_STREAM}",
                    shorten(&scrub(v.unwrap_or("<not ASCII>")))
                ),
            ),
            None => fail(
                FailureKind::Client,
                format!("{answer} without a Content-Type (expected {EVENT_STREAM})"),
            ),
        };
    }
    if code == 204 {
        return fail(
            FailureKind::NoContent,
            format!("{answer}: the server asks the client to stop reconnecting"),
        );
    }
    if (500..600).contains(&code) || code == 408 || code == 429 {
        let retry_after = text(RETRY_AFTER)
            .flatten()
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let what = match retry_after {
            // An HTTP date leaves a remainder down to nanoseconds: shown in milliseconds.
            Some(d) => format!(
                "{answer}, Retry-After {}",
                humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
            ),
            None => answer,
        };
        return Verdict::Fail {
            kind: FailureKind::Unavailable,
            what,
            retry_after,
        };
    }
    if id_rejected {
        return fail(
            FailureKind::IdRejected,
            format!(
                "{answer} to the request with a Last-Event-ID (listed in rejected_id_statuses)"
            ),
        );
    }
    let what = if (400..500).contains(&code) {
        answer
    } else if (300..400).contains(&code) {
        format!("{answer}: a redirect that was not followed (no usable Location header?)")
    } else {
        format!("{answer}: unexpected status (expected 200 with {EVENT_STREAM})")
    };
    fail(FailureKind::Client, what)
}

/// Whether a `Content-Type` value is the `text/event-stream` media type: parameters such as
/// `; charset=utf-8` allowed, case-insensitive, surrounding whitespace ignored.
pub fn is_event_stream(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(EVENT_STREAM))
}

/// What makes a response's body unreadable: a `Content-Encoding` other than `identity`, or a
/// `Transfer-Encoding` coding other than `chunked` (the bridge decodes neither).
fn unreadable_coding(headers: &HeaderMap, gzip: bool) -> Option<String> {
    if gzip && is_gzip_encoded(headers) {
        return transfer_coding_problem(headers);
    }
    if let Some(v) = headers.get(CONTENT_ENCODING) {
        let text = v.to_str().ok().map(str::trim);
        let codings: Vec<&str> = text
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
            .collect();
        if !codings.is_empty() || text.is_none() {
            return Some(format!(
                "Content-Encoding `{}`",
                shorten(&escape_controls(text.unwrap_or("<not ASCII>")))
            ));
        }
    }
    transfer_coding_problem(headers)
}

/// Whether the body's content coding is exactly one gzip (`gzip` or `x-gzip`, `identity`
/// aside), in one `Content-Encoding` field.
pub fn is_gzip_encoded(headers: &HeaderMap) -> bool {
    let mut fields = headers.get_all(CONTENT_ENCODING).iter();
    let (Some(v), None) = (fields.next(), fields.next()) else {
        return false;
    };
    let codings: Vec<&str> = v
        .to_str()
        .unwrap_or("<not ASCII>")
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
        .collect();
    matches!(&codings[..], [c] if c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip"))
}

/// A `Transfer-Encoding` coding other than `chunked`, named.
fn transfer_coding_problem(headers: &HeaderMap) -> Option<String> {
    let codings: Vec<String> = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("chunked"))
        .map(str::to_ascii_lowercase)
        .collect();
    if !codings.is_empty() {
        return Some(format!(
            "Transfer-Encoding `{}`",
            shorten(&codings.join(", "))
        ));
    }
    None
}

/// `s` with control characters (C0, DEL, C1) escaped, as every text for people is
/// (ARCHITECTURE.md §8).
fn escape_controls(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !matches!(c, '\0'..='\x1f' | '\x7f'..='\u{9f}') {
            out.push(c);
        } else if (c as u32) < 0x80 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    out
}

/// At most 100 characters of a server-provided string, for messages.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 100 {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(100).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(status: u16, headers: &[(&str, &str)], rejected: bool) -> Verdict {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        classify(
            StatusCode::from_u16(status).unwrap(),
            &map,
            None,
            rejected,
            |t| t.replace("s3cret", "[redacted]"),
        )
    }

    fn kind(v: &Verdict) -> Option<FailureKind> {
        match v {
            Verdict::Open => None,
            Verdict::Fail { kind, .. } => Some(*kind),
        }
    }

    #[test]
    fn statuses_and_content_types_decide_the_verdict() {
        let sse = [("content-type", "text/event-stream; charset=utf-8")];
        assert_eq!(verdict(200, &sse, false), Verdict::Open);
        assert_eq!(
            kind(&verdict(204, &[], false)),
            Some(FailureKind::NoContent)
        );
        for code in [500, 503, 408, 429] {
            assert_eq!(
                kind(&verdict(code, &[], false)),
                Some(FailureKind::Unavailable)
            );
        }
        assert_eq!(
            kind(&verdict(410, &[], true)),
            Some(FailureKind::IdRejected)
        );
        assert_eq!(kind(&verdict(410, &[], false)), Some(FailureKind::Client));
        assert_eq!(kind(&verdict(302, &[], false)), Some(FailureKind::Client));
        match verdict(200, &[("content-type", "text/html; k=s3cret")], false) {
            Verdict::Fail { kind, what, .. } => {
                assert_eq!(kind, FailureKind::Client);
                assert!(
                    what.contains("[redacted]") && !what.contains("s3cret"),
                    "{what}"
                );
            }
            other => panic!("{other:?}"),
        }
        match verdict(503, &[("retry-after", "7")], false) {
            Verdict::Fail {
                retry_after, what, ..
            } => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
                assert!(what.contains("Retry-After 7s"), "{what}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn codings_the_bridge_does_not_decode_are_refused_naming_them() {
        let sse = ("content-type", "text/event-stream");
        for (header, shown) in [
            (("content-encoding", "gzip"), "Content-Encoding `gzip`"),
            (
                ("transfer-encoding", "gzip, chunked"),
                "Transfer-Encoding `gzip`",
            ),
        ] {
            match verdict(200, &[sse, header], false) {
                Verdict::Fail { kind, what, .. } => {
                    assert_eq!(kind, FailureKind::Network);
                    assert!(what.contains(shown), "{what}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            verdict(
                200,
                &[
                    sse,
                    ("content-encoding", "identity"),
                    ("transfer-encoding", "chunked")
                ],
                false
            ),
            Verdict::Open
        );
    }

    #[test]
    fn long_server_strings_are_shortened() {
        assert_eq!(shorten("abc"), "abc");
        let long = "x".repeat(500);
        assert_eq!(shorten(&long).chars().count(), 101);
    }

    #[test]
    fn event_stream_media_type() {
        for ok in [
            "text/event-stream",
            "TEXT/Event-Stream",
            "text/event-stream; charset=utf-8",
            " text/event-stream ;charset=UTF-8",
            "text/event-stream;",
        ] {
            assert!(is_event_stream(ok), "{ok:?}");
        }
        for bad in [
            "",
            "text/plain",
            "text/event-streams",
            "text/event-stream-x",
            "application/json; x=text/event-stream",
            "text/html, text/event-stream",
        ] {
            assert!(!is_event_stream(bad), "{bad:?}");
        }
    }
}
