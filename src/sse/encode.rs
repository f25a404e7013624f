//! SSE framing, the inverse of [`super::parser`]: one event as `text/event-stream` bytes, for
//! `replay --format sse` and `serve`.

/// Appends one event in `text/event-stream` framing: an `id:` line (when `id` is given;
/// `Some("")` writes `id:` alone, which resets the last event ID), an `event:` line, one
/// `data:` line per line of data, and the blank line that dispatches it. It parses back to
/// the same type, data and id, as long as the data holds no CR (a CR ends a line in SSE and
/// is written as a line break) and the id and type hold no line breaks (written as spaces;
/// the bridge's parser never produces either).
pub fn encode_sse(id: Option<&str>, event_type: &str, data: &str, out: &mut Vec<u8>) {
    if let Some(id) = id {
        out.extend_from_slice(b"id:");
        if !id.is_empty() {
            out.push(b' ');
            push_single_line(out, id);
        }
        out.push(b'\n');
    }
    out.extend_from_slice(b"event: ");
    push_single_line(out, event_type);
    out.push(b'\n');
    let mut rest = data;
    loop {
        out.extend_from_slice(b"data: ");
        match rest.find(['\r', '\n']) {
            Some(i) => {
                out.extend_from_slice(&rest.as_bytes()[..i]);
                out.push(b'\n');
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                out.extend_from_slice(rest.as_bytes());
                out.push(b'\n');
                break;
            }
        }
    }
    out.push(b'\n');
}

fn push_single_line(out: &mut Vec<u8>, s: &str) {
    if s.contains(['\r', '\n']) {
        out.extend_from_slice(s.replace(['\r', '\n'], " ").as_bytes());
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::parser::{Item, Limits, Parser};

    fn parse(bytes: &[u8]) -> Vec<(String, String, String)> {
        let mut parser = Parser::new(Limits {
            max_line_bytes: 1 << 20,
            max_event_bytes: 1 << 20,
            ..Limits::default()
        });
        let mut items = Vec::new();
        parser.push(bytes, &mut items).unwrap();
        items
            .into_iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some((e.id.to_string(), e.event_type.to_string(), e.data)),
                Item::LastEventId(_) => None,
            })
            .collect()
    }

    #[test]
    fn sse_framing_round_trips_through_the_parser() {
        let cases = [
            ("1", "message", "plain"),
            ("2", "edit", "two\nlines"),
            ("3", "edit", "\nleading and trailing\n"),
            ("", "reset", "id reset to empty"),
            ("4 with spaces", "x", " leading space kept"),
            ("5", "t", ""),
            ("6", "t", "a\n\nb"),
            ("7", "caf\u{e9}", "\u{1F600} : not a comment"),
        ];
        let mut out = Vec::new();
        for (id, t, d) in cases {
            encode_sse(Some(id), t, d, &mut out);
        }
        let got = parse(&out);
        let want: Vec<(String, String, String)> = cases
            .iter()
            .map(|(i, t, d)| (i.to_string(), t.to_string(), d.to_string()))
            .collect();
        assert_eq!(got, want);
        // Line breaks the format cannot carry do not break the framing.
        let mut out = Vec::new();
        encode_sse(Some("a\nb"), "x\ry", "one\r\ntwo\rthree", &mut out);
        assert_eq!(
            parse(&out),
            [(
                "a b".to_string(),
                "x y".to_string(),
                "one\ntwo\nthree".to_string()
            )]
        );
    }

    #[test]
    fn without_an_id_no_id_line_is_written() {
        let mut out = Vec::new();
        encode_sse(None, "t", "d", &mut out);
        assert_eq!(out, b"event: t\ndata: d\n\n");
    }
}
