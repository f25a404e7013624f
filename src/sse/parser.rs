//! Incremental parser for `text/event-stream` (WHATWG HTML, "Parsing an event stream" and
//! "Interpreting an event stream"), as ARCHITECTURE.md §2 requires: the same items for any chunk split.
//!
//! The parser works on bytes and decodes per line. That is equivalent to decoding the whole stream
//! with `String::from_utf8_lossy`: CR (0x0D) and LF (0x0A) never occur inside a UTF-8 multi-byte
//! sequence, and the lossy decoder never swallows an ASCII byte into an invalid sequence, so the
//! decoded stream splits into lines exactly where the bytes do. For the same reason a line can be
//! split at its first `:` byte and the one space byte after it before decoding. The tests check this
//! against a reference that decodes the whole stream first.
//!
//! Only the unterminated tail of a chunk is copied into the parser; complete lines are processed
//! in place, and a field value is copied once into the data buffer and once into the event.

use std::sync::Arc;

use memchr::{memchr, memchr2};

/// One dispatched event, before the bridge stamps it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The event type buffer, or `message` when it was empty. Shared with the previous event
    /// when it has the same type (streams mostly repeat a few types): no allocation.
    pub event_type: Arc<str>,
    /// The data buffer with its one trailing LF removed.
    pub data: String,
    /// The last event ID string as of this event. Shared with every event dispatched under the
    /// same ID and with the checkpoint tracker: one allocation per ID change.
    pub id: Arc<str>,
}

/// What the parser hands out, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A dispatched event.
    Event(SseEvent),
    /// A blank line dispatched with an empty data buffer, but the last event ID string changed
    /// (e.g. `id: 42` followed by a blank line). Nothing is dispatched, yet a reconnection
    /// would now send this ID.
    LastEventId(String),
}

/// Limits that keep memory bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line accepted, in bytes (the line terminator not counted).
    pub max_line_bytes: usize,
    /// Largest data buffer accepted, in bytes. Counted as the size the dispatched `data` would
    /// have (decoded UTF-8, the trailing LF that dispatch removes not counted), so an event whose
    /// data is exactly this long is accepted.
    pub max_event_bytes: usize,
    /// Longest `id` value accepted, in bytes (as sent, before UTF-8 decoding). The last event
    /// ID is repeated on every later event, so without this bound a single huge `id:` would
    /// multiply the size of everything stored after it.
    pub max_id_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            max_id_bytes: 4096,
        }
    }
}

/// A stream that broke a limit. The stream cannot be resumed mid-line: reconnect.
///
/// `size` is the size observed when the limit was found broken, a lower bound of the real size
/// (the parser stops reading the line or event there, which keeps memory bounded); it may differ
/// with the chunk split, the kind of error does not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line (terminator not counted) is longer than [`Limits::max_line_bytes`].
    #[error("a line of at least {size} bytes exceeds the limit of {limit} bytes (max_event_size)")]
    LineTooLong {
        /// Bytes of the line seen so far.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An event's data is larger than [`Limits::max_event_bytes`].
    #[error(
        "an event of at least {size} bytes exceeds the limit of {limit} bytes (max_event_size)"
    )]
    EventTooLarge {
        /// Bytes of the event's data seen so far.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An `id` field's value is longer than [`Limits::max_id_bytes`].
    #[error("an id of {size} bytes exceeds the limit of {limit} bytes (max_id_size)")]
    IdTooLong {
        /// Bytes of the id value.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
}

/// Capacity a buffer keeps between events. A stream's events are alike in size, so buffers keep
/// what the last event needed, but no more than this: after one huge event (up to
/// `max_event_size`, 1 GiB at most) the memory goes back to the allocator instead of staying
/// with the feed for ever (ARCHITECTURE.md, "Hostile input and bounded resources").
const RETAINED_CAPACITY: usize = 64 * 1024;

/// The UTF-8 byte order mark, stripped once at the start of each stream.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// The incremental `text/event-stream` parser of one feed.
///
/// One parser serves a feed across reconnections: call [`Parser::start_stream`] for every new
/// HTTP response, [`Parser::push`] for each chunk read, and [`Parser::finish`] at end of stream.
/// It keeps the last event ID and the reconnection time across streams, as an `EventSource` does.
///
/// After `push` returned an error the stream is unusable (it cannot resume mid-line): further
/// `push` calls return the same error until `start_stream` (or `finish`) starts a new stream.
#[derive(Debug, Clone)]
pub struct Parser {
    limits: Limits,
    /// The unterminated tail of the previous chunk(s); never longer than `max_line_bytes`, and
    /// its capacity never grows beyond that either.
    line: Vec<u8>,
    /// The previous chunk ended with CR: a LF starting the next chunk belongs to that line end.
    last_was_cr: bool,
    /// How many bytes of a leading BOM have been matched so far, or `None` once the start of
    /// the stream is past (BOM stripped or not there).
    bom_matched: Option<usize>,
    /// The data buffer (every `data` value followed by LF).
    data: String,
    /// The event type buffer.
    event_type: String,
    /// The last event ID buffer: set by `id` fields, copied to `last_event_id` at dispatch.
    id_buffer: String,
    /// The last event ID string, as of the last dispatch.
    last_event_id: Arc<str>,
    /// The type of the last dispatched event, reused while the type repeats.
    last_type: Arc<str>,
    /// A `retry` value not yet taken by [`Parser::take_retry`].
    retry: Option<u64>,
    /// The error that broke the current stream, returned again by `push` until a new stream.
    failed: Option<ParseError>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser::new(Limits::default())
    }
}

impl Parser {
    /// A parser ready for its first stream, with an empty last event ID.
    pub fn new(limits: Limits) -> Self {
        Parser {
            limits,
            line: Vec::new(),
            last_was_cr: false,
            bom_matched: Some(0),
            data: String::new(),
            event_type: String::new(),
            id_buffer: String::new(),
            last_event_id: Arc::from(""),
            last_type: Arc::from("message"),
            retry: None,
            failed: None,
        }
    }

    /// Starts a new stream (new HTTP connection): clears the line, data and event type buffers,
    /// the CR and BOM state and a previous error, and sets the last event ID buffer to
    /// `last_event_id` (the ID the bridge sent as `Last-Event-ID`), so an ID persists across
    /// reconnections as ARCHITECTURE.md §1 requires. The last event ID string is set to it too, so
    /// [`Parser::last_event_id`] reports it at once and the first blank line of the stream does
    /// not count as an ID change. Does NOT clear the reconnection time: a `retry` value not yet
    /// taken stays available to [`Parser::take_retry`].
    pub fn start_stream(&mut self, last_event_id: &str) {
        self.line.clear();
        if self.line.capacity() > RETAINED_CAPACITY {
            self.line = Vec::new();
        }
        if self.data.capacity() > RETAINED_CAPACITY {
            self.data = String::new();
        }
        self.last_was_cr = false;
        self.bom_matched = Some(0);
        self.data.clear();
        self.event_type.clear();
        self.id_buffer.clear();
        self.id_buffer.push_str(last_event_id);
        if *self.last_event_id != *last_event_id {
            self.last_event_id = Arc::from(last_event_id);
        }
        self.failed = None;
    }

    /// Feeds the next chunk of bytes (any split, including inside CRLF, inside the BOM and
    /// inside a multi-byte UTF-8 sequence); appends dispatched items to `out` in stream order.
    ///
    /// On error, the items dispatched before the offending line are already in `out` (they are
    /// complete and valid, and the same for any split); the stream must then be restarted.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Item>) -> Result<(), ParseError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let result = self.push_inner(chunk, out);
        if let Err(err) = &result {
            self.failed = Some(err.clone());
        }
        result
    }

    /// End of stream: an unfinished event (and an unterminated last line) is discarded, as the
    /// standard says, including an `id` field of that unfinished event (the last event ID string
    /// only changes at dispatch). Leaves the parser as `start_stream(self.last_event_id())` would.
    pub fn finish(&mut self) {
        let id = self.last_event_id.clone();
        self.start_stream(&id);
    }

    /// The last event ID string (updated at every blank line, as the standard says).
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// The `retry:` value (ms) most recently parsed, if one arrived since the last call.
    ///
    /// A value of only ASCII digits too large for `u64` saturates to `u64::MAX`: the standard
    /// accepts any such integer, and "wait as long as possible" is closer to it than ignoring
    /// the field; the retry policy caps it anyway.
    pub fn take_retry(&mut self) -> Option<u64> {
        self.retry.take()
    }

    fn push_inner(&mut self, chunk: &[u8], out: &mut Vec<Item>) -> Result<(), ParseError> {
        let mut rest = chunk;
        if self.bom_matched.is_some() {
            rest = self.strip_bom(rest)?;
        }
        if rest.is_empty() {
            return Ok(());
        }
        if self.last_was_cr {
            self.last_was_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        // Complete the line buffered from earlier chunks, if any.
        if !self.line.is_empty() {
            let Some(pos) = memchr2(b'\n', b'\r', rest) else {
                return self.buffer_tail(rest);
            };
            self.check_line(self.line.len() + pos)?;
            self.reserve_line(pos);
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(&rest[..pos]);
            let result = self.process_line(&line, out);
            line.clear();
            if line.capacity() <= RETAINED_CAPACITY {
                self.line = line;
            }
            result?;
            rest = self.skip_terminator(rest, pos);
        }
        // Complete lines inside the chunk, in place.
        while let Some(pos) = memchr2(b'\n', b'\r', rest) {
            self.check_line(pos)?;
            self.process_line(&rest[..pos], out)?;
            rest = self.skip_terminator(rest, pos);
        }
        self.buffer_tail(rest)
    }

    /// Strips a leading BOM, which may arrive split across chunks. A partial BOM followed by
    /// something else is ordinary line content (it decodes to U+FFFD), so it goes to the line.
    fn strip_bom<'a>(&mut self, mut rest: &'a [u8]) -> Result<&'a [u8], ParseError> {
        while let Some(matched) = self.bom_matched {
            let Some((&first, tail)) = rest.split_first() else {
                break;
            };
            if first == BOM[matched] {
                rest = tail;
                self.bom_matched = if matched + 1 == BOM.len() {
                    None
                } else {
                    Some(matched + 1)
                };
            } else {
                self.bom_matched = None;
                self.buffer_tail(&BOM[..matched])?;
            }
        }
        Ok(rest)
    }

    /// Skips the line terminator at `rest[pos]` (CR, LF or CRLF). A CR ending the chunk may be
    /// the first half of a CRLF: remember it so that `push` skips a LF starting the next chunk.
    fn skip_terminator<'a>(&mut self, rest: &'a [u8], pos: usize) -> &'a [u8] {
        let after = &rest[pos + 1..];
        if rest[pos] == b'\r' {
            match after.first() {
                Some(b'\n') => return &after[1..],
                None => self.last_was_cr = true,
                Some(_) => {}
            }
        }
        after
    }

    fn check_line(&self, size: usize) -> Result<(), ParseError> {
        if size > self.limits.max_line_bytes {
            return Err(ParseError::LineTooLong {
                size,
                limit: self.limits.max_line_bytes,
            });
        }
        Ok(())
    }

    /// Buffers an unterminated line tail, refusing (before copying) to go beyond the limit.
    fn buffer_tail(&mut self, tail: &[u8]) -> Result<(), ParseError> {
        if tail.is_empty() {
            return Ok(());
        }
        self.check_line(self.line.len() + tail.len())?;
        self.reserve_line(tail.len());
        self.line.extend_from_slice(tail);
        Ok(())
    }

    /// Grows the line buffer geometrically (amortised O(1) per byte) but never beyond the line
    /// limit, so a parser fed an endless line holds at most `max_line_bytes` for it. Callers
    /// checked that the result fits the limit.
    fn reserve_line(&mut self, additional: usize) {
        let needed = self.line.len() + additional;
        if needed > self.line.capacity() {
            let target = self
                .line
                .capacity()
                .saturating_mul(2)
                .min(self.limits.max_line_bytes)
                .max(needed);
            self.line.reserve_exact(target - self.line.len());
        }
    }

    /// Interprets one complete line (terminator and a leading BOM already removed).
    fn process_line(&mut self, line: &[u8], out: &mut Vec<Item>) -> Result<(), ParseError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        // Splitting the bytes at the first b':' and one b' ' equals splitting the decoded line
        // at the first ':' and one ' ' (see the module docs).
        let (field, value) = match memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        // Field names are matched as bytes: a byte string equals one of these ASCII names
        // exactly when its lossy decoding does, and names are case-sensitive. Written as slice
        // patterns, they compile to a length check and byte compares (byte-string literals
        // would be a `memcmp` call per line).
        match field {
            [b'd', b'a', b't', b'a'] => self.append_data(value)?,
            [b'e', b'v', b'e', b'n', b't'] => {
                self.event_type.clear();
                push_lossy(&mut self.event_type, value);
            }
            // U+0000 is encoded as the byte 0 and nothing else decodes to it.
            [b'i', b'd'] if memchr(0, value).is_none() => {
                if value.len() > self.limits.max_id_bytes {
                    return Err(ParseError::IdTooLong {
                        size: value.len(),
                        limit: self.limits.max_id_bytes,
                    });
                }
                self.id_buffer.clear();
                push_lossy(&mut self.id_buffer, value);
            }
            [b'r', b'e', b't', b'r', b'y']
                if !value.is_empty() && value.iter().all(u8::is_ascii_digit) =>
            {
                self.retry = Some(value.iter().fold(0u64, |ms, &digit| {
                    ms.saturating_mul(10)
                        .saturating_add(u64::from(digit - b'0'))
                }));
            }
            _ => {}
        }
        Ok(())
    }

    /// Appends a `data` value and LF, refusing to let the event's data exceed the limit.
    fn append_data(&mut self, value: &[u8]) -> Result<(), ParseError> {
        let limit = self.limits.max_event_bytes;
        let before = self.data.len();
        // Decoding never shrinks (an invalid sequence of 1-3 bytes becomes 3 bytes), so the raw
        // length rejects an oversized value before anything is copied.
        if before + value.len() > limit {
            return Err(ParseError::EventTooLarge {
                size: before + value.len(),
                limit,
            });
        }
        push_lossy(&mut self.data, value);
        if self.data.len() > limit {
            let size = self.data.len();
            self.data.truncate(before);
            return Err(ParseError::EventTooLarge { size, limit });
        }
        self.data.push('\n');
        Ok(())
    }

    /// A blank line: "dispatch the event" as the standard says.
    fn dispatch(&mut self, out: &mut Vec<Item>) {
        let id_changed = *self.id_buffer != *self.last_event_id;
        if id_changed {
            self.last_event_id = Arc::from(self.id_buffer.as_str());
        }
        if self.data.is_empty() {
            self.event_type.clear();
            if id_changed {
                out.push(Item::LastEventId(self.last_event_id.to_string()));
            }
            return;
        }
        let event_type = if self.event_type.is_empty() {
            "message"
        } else {
            self.event_type.as_str()
        };
        if *self.last_type != *event_type {
            self.last_type = Arc::from(event_type);
        }
        // The data buffer is non-empty only through `append_data`, which ends it with LF.
        // The buffer itself becomes the event's data (no copy); the next event's buffer starts
        // with room for as much as this one held, since events of a stream are alike in size.
        self.data.pop();
        let room = (self.data.len() + 1).min(RETAINED_CAPACITY);
        let data = std::mem::replace(&mut self.data, String::with_capacity(room));
        out.push(Item::Event(SseEvent {
            event_type: self.last_type.clone(),
            data,
            id: self.last_event_id.clone(),
        }));
        self.event_type.clear();
    }

    /// Capacity of the buffer holding an unterminated line, for the bounded-memory tests.
    #[cfg(test)]
    fn line_capacity(&self) -> usize {
        self.line.capacity()
    }
}

/// Appends `bytes` decoded as UTF-8 with U+FFFD for each invalid sequence (exactly
/// `String::from_utf8_lossy`), without allocating: valid input, the common case, is one
/// validation and one copy.
fn push_lossy(dst: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => dst.push_str(text),
        Err(_) => {
            for chunk in bytes.utf8_chunks() {
                dst.push_str(chunk.valid());
                if !chunk.invalid().is_empty() {
                    dst.push(char::REPLACEMENT_CHARACTER);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- helpers -------------------------------------------------------------------------

    fn ev(event_type: &str, data: &str, id: &str) -> Item {
        Item::Event(SseEvent {
            event_type: event_type.into(),
            data: data.to_owned(),
            id: id.into(),
        })
    }

    fn msg(data: &str) -> Item {
        ev("message", data, "")
    }

    /// Everything observable after feeding a stream.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        items: Vec<Item>,
        /// The kind of the first error (sizes may differ with the split), if any.
        error: Option<std::mem::Discriminant<ParseError>>,
        last_event_id: String,
        retry: Option<u64>,
    }

    fn run_with(limits: Limits, chunks: &[&[u8]]) -> Outcome {
        let mut parser = Parser::new(limits);
        let mut items = Vec::new();
        let mut error = None;
        for chunk in chunks {
            if let Err(err) = parser.push(chunk, &mut items) {
                error = Some(std::mem::discriminant(&err));
                break;
            }
        }
        parser.finish();
        Outcome {
            items,
            error,
            last_event_id: parser.last_event_id().to_owned(),
            retry: parser.take_retry(),
        }
    }

    fn run(chunks: &[&[u8]]) -> Outcome {
        run_with(Limits::default(), chunks)
    }

    /// Items of a stream fed in one push; panics on a parse error.
    fn items(stream: &[u8]) -> Vec<Item> {
        let outcome = run(&[stream]);
        assert_eq!(outcome.error, None);
        outcome.items
    }

    fn push_ok(parser: &mut Parser, chunk: &[u8]) -> Vec<Item> {
        let mut out = Vec::new();
        parser.push(chunk, &mut out).expect("no parse error");
        out
    }

    /// A deliberately naive reference: decode the WHOLE stream with `from_utf8_lossy`, strip one
    /// BOM, split into lines by chars, interpret by the standard's prose. Agreement with it checks
    /// that decoding per line (and splitting bytes at ':' and ' ') is equivalent.
    fn reference(stream: &[u8]) -> Outcome {
        let text = String::from_utf8_lossy(stream);
        let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
        let mut lines = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\r' => {
                    if chars.peek() == Some(&'\n') {
                        chars.next();
                    }
                    lines.push(std::mem::take(&mut current));
                }
                '\n' => lines.push(std::mem::take(&mut current)),
                c => current.push(c),
            }
        }
        // `current` is an unterminated last line: discarded.
        let (mut data, mut event_type, mut id_buffer, mut last_id) =
            (String::new(), String::new(), String::new(), String::new());
        let mut retry = None;
        let mut items = Vec::new();
        for line in lines {
            if line.is_empty() {
                let changed = last_id != id_buffer;
                last_id = id_buffer.clone();
                if data.is_empty() {
                    event_type.clear();
                    if changed {
                        items.push(Item::LastEventId(last_id.clone()));
                    }
                    continue;
                }
                if data.ends_with('\n') {
                    data.pop();
                }
                let ty = if event_type.is_empty() {
                    "message".to_owned()
                } else {
                    event_type.clone()
                };
                items.push(ev(&ty, &data, &last_id));
                data.clear();
                event_type.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.find(':') {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(' ').unwrap_or(v))
                }
                None => (&line[..], ""),
            };
            match field {
                "event" => event_type = value.to_owned(),
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                "id" if !value.contains('\u{0}') => id_buffer = value.to_owned(),
                "retry" if !value.is_empty() && value.chars().all(|c| c.is_ascii_digit()) => {
                    retry = Some(value.parse::<u64>().unwrap_or(u64::MAX));
                }
                _ => {}
            }
        }
        Outcome {
            items,
            error: None,
            last_event_id: last_id,
            retry,
        }
    }

    // ---- BOM -----------------------------------------------------------------------------

    #[test]
    fn bom_stripped_once() {
        assert_eq!(items(b"\xEF\xBB\xBFdata: x\n\n"), vec![msg("x")]);
        // Without stripping, the field would be "\u{FEFF}data" and nothing would dispatch.
        assert_eq!(items("\u{FEFF}\n".as_bytes()), vec![]);
    }

    #[test]
    fn second_bom_kept() {
        // The second BOM is part of the field name, which is then unknown.
        assert_eq!(items("\u{FEFF}\u{FEFF}data: x\n\n".as_bytes()), vec![]);
        assert_eq!(
            items("\u{FEFF}data: \u{FEFF}y\n\n".as_bytes()),
            vec![msg("\u{FEFF}y")]
        );
        // A BOM that does not start the stream is not stripped.
        assert_eq!(items("\n\u{FEFF}data: x\n\n".as_bytes()), vec![]);
        assert_eq!(items(b"\n\xEF\xBB\xBF:\n\ndata: z\n\n"), vec![msg("z")]);
    }

    #[test]
    fn bom_split_across_chunks_and_per_stream() {
        let mut parser = Parser::new(Limits::default());
        assert!(push_ok(&mut parser, b"\xEF").is_empty());
        assert!(push_ok(&mut parser, b"").is_empty());
        assert!(push_ok(&mut parser, b"\xBB").is_empty());
        assert_eq!(push_ok(&mut parser, b"\xBFdata: a\n\n"), vec![msg("a")]);
        // Each new stream may start with its own BOM.
        parser.start_stream("");
        assert_eq!(
            push_ok(&mut parser, b"\xEF\xBB\xBFdata: b\n\n"),
            vec![msg("b")]
        );
        parser.finish();
        assert_eq!(
            push_ok(&mut parser, b"\xEF\xBB\xBFdata: c\n\n"),
            vec![msg("c")]
        );
    }

    #[test]
    fn partial_bom_is_content() {
        // EF BB then 'd' is an invalid sequence (one U+FFFD) in the field name.
        let mut parser = Parser::new(Limits::default());
        assert!(push_ok(&mut parser, b"\xEF\xBB").is_empty());
        assert!(push_ok(&mut parser, b"data: x\n\n").is_empty());
        assert_eq!(items(b"\xEF\xBBdata: x\n\n"), vec![]);
        assert_eq!(items(b"\xEF\xBB\ndata: x\n\n"), vec![msg("x")]);
        assert_eq!(items(b"\xEF\xBB:x\n\ndata:y\n\n"), vec![msg("y")]);
        assert_eq!(
            reference(b"\xEF\xBBdata: x\n\n"),
            run(&[b"\xEF\xBB", b"data: x\n\n"])
        );
    }

    // ---- line ends -----------------------------------------------------------------------

    #[test]
    fn line_ends_crlf_lf_cr() {
        let expected = vec![msg("a\nb\nc"), msg("d")];
        assert_eq!(items(b"data: a\ndata: b\ndata: c\n\ndata: d\n\n"), expected);
        assert_eq!(
            items(b"data: a\r\ndata: b\r\ndata: c\r\n\r\ndata: d\r\n\r\n"),
            expected
        );
        assert_eq!(items(b"data: a\rdata: b\rdata: c\r\rdata: d\r\r"), expected);
        assert_eq!(
            items(b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\n\r"),
            expected
        );
        // LF CR is two line ends, so it dispatches.
        assert_eq!(items(b"data: a\n\r"), vec![msg("a")]);
    }

    #[test]
    fn cr_and_lf_split_across_chunks() {
        // CR | LF is one line end, not a blank line.
        let mut parser = Parser::new(Limits::default());
        assert!(push_ok(&mut parser, b"data: a\r").is_empty());
        assert!(push_ok(&mut parser, b"\ndata: b\r").is_empty());
        assert!(push_ok(&mut parser, b"").is_empty()); // an empty chunk keeps the CR state
        assert!(push_ok(&mut parser, b"\n").is_empty());
        assert_eq!(push_ok(&mut parser, b"\r\n"), vec![msg("a\nb")]);
        // CR | CR is two line ends.
        assert!(push_ok(&mut parser, b"data: c\r").is_empty());
        assert_eq!(push_ok(&mut parser, b"\r"), vec![msg("c")]);
        // A buffered line completed by a CR at the end of a chunk, then LF.
        assert!(push_ok(&mut parser, b"data: d").is_empty());
        assert!(push_ok(&mut parser, b"e\r").is_empty());
        assert!(push_ok(&mut parser, b"\n").is_empty());
        assert_eq!(push_ok(&mut parser, b"\n"), vec![msg("de")]);
    }

    // ---- fields --------------------------------------------------------------------------

    #[test]
    fn comments_ignored() {
        assert_eq!(
            items(b":\n: comment\n:data: x\ndata: y\n:\n\n"),
            vec![msg("y")]
        );
        // A comment-only block dispatches nothing.
        assert_eq!(items(b": keep-alive\n\n"), vec![]);
    }

    #[test]
    fn colon_space_handling_only_one_space_removed() {
        assert_eq!(items(b"data:test\n\n"), vec![msg("test")]);
        assert_eq!(items(b"data: test\n\n"), vec![msg("test")]);
        assert_eq!(items(b"data:  test\n\n"), vec![msg(" test")]);
        assert_eq!(items(b"data:\ttest\n\n"), vec![msg("\ttest")]);
        // Only the first colon splits.
        assert_eq!(items(b"data: a:b: c\n\n"), vec![msg("a:b: c")]);
        // A space before the colon belongs to the field name.
        assert_eq!(items(b"data : x\n\n"), vec![]);
    }

    #[test]
    fn line_without_colon_is_field_with_empty_value() {
        assert_eq!(items(b"data\n\n"), vec![msg("")]);
        assert_eq!(items(b"event: a\nevent\ndata: x\n\n"), vec![msg("x")]);
        assert_eq!(items(b"id: 1\nid\ndata: x\n\n"), vec![msg("x")]);
        assert_eq!(items(b"retry\n\n"), vec![]);
        assert_eq!(run(&[b"retry\n"]).retry, None);
    }

    #[test]
    fn event_type_set() {
        assert_eq!(
            items(b"event: add\ndata: 1\n\ndata: 2\n\nevent: a\nevent: b\ndata: 3\n\n"),
            vec![ev("add", "1", ""), msg("2"), ev("b", "3", "")]
        );
    }

    #[test]
    fn data_lines_joined_with_lf() {
        assert_eq!(
            items(b"data: YHOO\ndata: +2\ndata: 10\n\n"),
            vec![msg("YHOO\n+2\n10")]
        );
        assert_eq!(items(b"data:\ndata:\n\n"), vec![msg("\n")]);
    }

    #[test]
    fn trailing_lf_removed_once() {
        assert_eq!(items(b"data: a\ndata:\n\n"), vec![msg("a\n")]);
        assert_eq!(items(b"data: a\ndata\ndata\n\n"), vec![msg("a\n\n")]);
    }

    #[test]
    fn empty_data_dispatches_nothing_but_resets_type() {
        assert_eq!(items(b"event: foo\n\ndata: x\n\n"), vec![msg("x")]);
        assert_eq!(items(b"event: foo\n\n"), vec![]);
    }

    #[test]
    fn id_with_nul_ignored() {
        assert_eq!(
            items(b"id: 1\n\ndata: a\nid: 2\x003\n\n"),
            vec![Item::LastEventId("1".into()), ev("message", "a", "1")]
        );
        // An overlong encoding of NUL is not NUL: it decodes to U+FFFD twice.
        assert_eq!(
            items(b"id: \xC0\x80\ndata: a\n\n"),
            vec![ev("message", "a", "\u{FFFD}\u{FFFD}")]
        );
    }

    #[test]
    fn empty_id_resets_to_empty() {
        assert_eq!(
            items(b"id: 7\ndata: a\n\nid:\ndata: b\n\ndata: c\n\n"),
            vec![ev("message", "a", "7"), msg("b"), msg("c")]
        );
        let outcome = run(&[b"id: 7\n\nid: \n\n"]);
        assert_eq!(
            outcome.items,
            vec![
                Item::LastEventId("7".into()),
                Item::LastEventId(String::new())
            ]
        );
        assert_eq!(outcome.last_event_id, "");
    }

    #[test]
    fn id_persists_across_events() {
        let outcome = run(&[b"id: 42\ndata: a\n\ndata: b\n\nevent: t\ndata: c\n\n"]);
        assert_eq!(
            outcome.items,
            vec![
                ev("message", "a", "42"),
                ev("message", "b", "42"),
                ev("t", "c", "42")
            ]
        );
        assert_eq!(outcome.last_event_id, "42");
        // The id field may follow the data in the same event; it applies at dispatch.
        assert_eq!(items(b"data: a\nid: 9\n\n"), vec![ev("message", "a", "9")]);
    }

    #[test]
    fn last_event_id_updates_only_at_dispatch() {
        let mut parser = Parser::new(Limits::default());
        assert!(push_ok(&mut parser, b"id: 5\n").is_empty());
        assert_eq!(parser.last_event_id(), "");
        assert_eq!(
            push_ok(&mut parser, b"\n"),
            vec![Item::LastEventId("5".into())]
        );
        assert_eq!(parser.last_event_id(), "5");
    }

    #[test]
    fn last_event_id_item_only_when_id_changes() {
        assert_eq!(
            items(b"id: 1\n\nid: 1\n\n\n\nid: 2\n\n"),
            vec![Item::LastEventId("1".into()), Item::LastEventId("2".into())]
        );
    }

    #[test]
    fn retry_digits_only() {
        let retry = |stream: &[u8]| run(&[stream]).retry;
        assert_eq!(retry(b"retry: 5000\n"), Some(5000));
        assert_eq!(retry(b"retry:5000\n"), Some(5000));
        assert_eq!(retry(b"retry: 0\n"), Some(0));
        assert_eq!(retry(b"retry: 007\n"), Some(7));
        assert_eq!(retry(b"retry: 1a\n"), None);
        assert_eq!(retry(b"retry:\n"), None);
        assert_eq!(retry(b"retry: \n"), None);
        assert_eq!(retry(b"retry:  5\n"), None);
        assert_eq!(retry(b"retry: 5 \n"), None);
        assert_eq!(retry(b"retry: -5\n"), None);
        assert_eq!(retry(b"retry: +5\n"), None);
        assert_eq!(retry(b"retry: 1.5\n"), None);
        assert_eq!(retry("retry: \u{0661}\n".as_bytes()), None); // Arabic-Indic one
        assert_eq!(retry(b"Retry: 5\n"), None);
        // A bad value keeps the earlier one; a later good one wins.
        assert_eq!(retry(b"retry: 10\nretry: x\n"), Some(10));
        assert_eq!(retry(b"retry: 10\nretry: 20\n"), Some(20));
        // An unterminated line is not a line.
        assert_eq!(retry(b"retry: 10"), None);
    }

    #[test]
    fn retry_overflow_saturates() {
        assert_eq!(
            run(&[b"retry: 18446744073709551615\n"]).retry,
            Some(u64::MAX)
        );
        assert_eq!(
            run(&[b"retry: 18446744073709551616\n"]).retry,
            Some(u64::MAX)
        );
        assert_eq!(
            run(&[b"retry: 99999999999999999999999999999\n"]).retry,
            Some(u64::MAX)
        );
    }

    #[test]
    fn take_retry_takes_once_and_applies_without_dispatch() {
        let mut parser = Parser::new(Limits::default());
        assert!(push_ok(&mut parser, b"data: x\nretry: 300\n").is_empty());
        assert_eq!(parser.take_retry(), Some(300));
        assert_eq!(parser.take_retry(), None);
        // An untaken value survives start_stream (the reconnection time is not reset).
        push_ok(&mut parser, b"retry: 400\n");
        parser.start_stream("");
        assert_eq!(parser.take_retry(), Some(400));
    }

    #[test]
    fn unknown_fields_ignored_and_names_case_sensitive() {
        assert_eq!(
            items(b"foo: bar\nData: x\nEVENT: y\nID: 3\ndata: z\nx-data: w\n\n"),
            vec![msg("z")]
        );
        assert_eq!(items(b"Data: x\n\n"), vec![]);
    }

    #[test]
    fn unfinished_event_discarded_at_eof() {
        let mut parser = Parser::new(Limits::default());
        assert_eq!(
            push_ok(
                &mut parser,
                b"data: a\n\nid: 3\nevent: t\ndata: b\n\ndata: c\nid: 4\n"
            ),
            vec![ev("message", "a", ""), ev("t", "b", "3"),]
        );
        parser.finish();
        assert_eq!(parser.last_event_id(), "3");
        // Nothing of the unfinished event leaks into the next stream.
        assert_eq!(
            push_ok(&mut parser, b"data: d\n\n"),
            vec![ev("message", "d", "3")]
        );
        // An unterminated last line is discarded too, even a blank-line-to-be.
        push_ok(&mut parser, b"data: e\ndata: f");
        parser.finish();
        assert_eq!(push_ok(&mut parser, b"\n"), vec![]);
        assert_eq!(
            push_ok(&mut parser, b"data: g\n\n"),
            vec![ev("message", "g", "3")]
        );
        // The spec's example: "data:  third event" without a blank line is not dispatched.
        assert_eq!(items(b"data: x\n"), vec![]);
        assert_eq!(items(b"data: x"), vec![]);
    }

    #[test]
    fn start_stream_seeds_id_and_clears_buffers() {
        let mut parser = Parser::new(Limits::default());
        push_ok(&mut parser, b"event: t\ndata: stale\nid: 99\ndata: part");
        parser.start_stream("41");
        assert_eq!(parser.last_event_id(), "41");
        // The seeded id is no change: a blank line emits nothing.
        assert!(push_ok(&mut parser, b"ial\n\n").is_empty());
        assert_eq!(
            push_ok(&mut parser, b"data: a\n\nid: 42\ndata: b\n\n"),
            vec![ev("message", "a", "41"), ev("message", "b", "42")]
        );
        // A pending CR does not survive either.
        push_ok(&mut parser, b"data: c\r");
        parser.start_stream("x");
        assert_eq!(
            push_ok(&mut parser, b"\ndata: d\n\n"),
            vec![ev("message", "d", "x")]
        );
    }

    #[test]
    fn invalid_utf8_replaced() {
        assert_eq!(items(b"data: a\xFFb\n\n"), vec![msg("a\u{FFFD}b")]);
        // A truncated sequence before LF is one U+FFFD, like from_utf8_lossy.
        assert_eq!(
            items(b"data: \xE2\x82\ndata: \xF0\x9F\x98\n\n"),
            vec![msg("\u{FFFD}\n\u{FFFD}")]
        );
        assert_eq!(
            items(b"event: \xC3\ndata: x\n\n"),
            vec![ev("\u{FFFD}", "x", "")]
        );
        assert_eq!(
            items(b"id: \xFE\xFF\ndata: x\n\n"),
            vec![ev("message", "x", "\u{FFFD}\u{FFFD}")]
        );
        // Valid multi-byte characters, split inside the sequence across chunks.
        let stream = "data: é€😀\n\n".as_bytes();
        for i in 0..=stream.len() {
            assert_eq!(
                run(&[&stream[..i], &stream[i..]]).items,
                vec![msg("é€😀")],
                "split at {i}"
            );
        }
        // An invalid sequence split across chunks decodes as in one piece.
        let stream = b"data: \xF0\x9F\x98x\xED\xA0\x80\n\n";
        let whole = String::from_utf8_lossy(&stream[6..stream.len() - 2]).into_owned();
        for i in 0..=stream.len() {
            assert_eq!(
                run(&[&stream[..i], &stream[i..]]).items,
                vec![msg(&whole)],
                "split at {i}"
            );
        }
    }

    // ---- limits --------------------------------------------------------------------------

    fn limits(line: usize, event: usize) -> Limits {
        Limits {
            max_line_bytes: line,
            max_event_bytes: event,
            max_id_bytes: line,
        }
    }

    #[test]
    fn id_limit() {
        let mut parser = Parser::new(Limits {
            max_id_bytes: 4,
            ..Limits::default()
        });
        assert_eq!(
            push_ok(&mut parser, b"id: abcd\ndata: x\n\n"),
            vec![ev("message", "x", "abcd")]
        );
        let mut out = Vec::new();
        assert_eq!(
            parser.push(b"data: y\n\nid: abcde\ndata: z\n\n", &mut out),
            Err(ParseError::IdTooLong { size: 5, limit: 4 })
        );
        // The event before the long id went out; the last event ID is still the old one.
        assert_eq!(out, vec![ev("message", "y", "abcd")]);
        assert_eq!(parser.last_event_id(), "abcd");
    }

    #[test]
    fn large_buffers_are_given_back_after_a_huge_event() {
        let mut parser = Parser::new(limits(8 << 20, 8 << 20));
        let big = format!("data: {}\n\n", "x".repeat(4 << 20));
        let mut out = Vec::new();
        // In pieces, so the line is buffered across chunks and grows.
        for piece in big.as_bytes().chunks(100_000) {
            parser.push(piece, &mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        assert!(
            parser.line_capacity() <= RETAINED_CAPACITY,
            "{}",
            parser.line_capacity()
        );
        assert!(
            parser.data.capacity() <= RETAINED_CAPACITY,
            "{}",
            parser.data.capacity()
        );
        push_ok(&mut parser, b"data: small\n\n");
    }

    #[test]
    fn line_limit() {
        // "data: 1234" is 10 bytes: exactly the limit passes.
        let mut parser = Parser::new(limits(10, 100));
        assert_eq!(push_ok(&mut parser, b"data: 1234\n\n"), vec![msg("1234")]);
        let mut out = Vec::new();
        assert_eq!(
            parser.push(b"data: x\n\ndata: 12345\n\n", &mut out),
            Err(ParseError::LineTooLong {
                size: 11,
                limit: 10
            })
        );
        // What came before the long line was dispatched.
        assert_eq!(out, vec![msg("x")]);
        // An unterminated line is refused as soon as it is too long.
        let mut parser = Parser::new(limits(10, 100));
        push_ok(&mut parser, b"data: ");
        assert_eq!(
            parser.push(b"abcdefgh", &mut out),
            Err(ParseError::LineTooLong {
                size: 14,
                limit: 10
            })
        );
        // A buffered line completed too long.
        let mut parser = Parser::new(limits(10, 100));
        push_ok(&mut parser, b"data: ");
        assert_eq!(
            parser.push(b"abcde\n", &mut out),
            Err(ParseError::LineTooLong {
                size: 11,
                limit: 10
            })
        );
        // Comments count too: the limit is about memory.
        let mut parser = Parser::new(limits(10, 100));
        assert_eq!(
            parser.push(b":01234567890\n", &mut out),
            Err(ParseError::LineTooLong {
                size: 12,
                limit: 10
            })
        );
    }

    #[test]
    fn event_limit() {
        let mut parser = Parser::new(limits(100, 10));
        // Exactly 10 bytes of data ("12345\n6789") passes.
        assert_eq!(
            push_ok(&mut parser, b"data: 12345\ndata: 6789\n\n"),
            vec![msg("12345\n6789")]
        );
        let mut out = Vec::new();
        assert_eq!(
            parser.push(b"data: 12345\ndata: 67890\n\n", &mut out),
            Err(ParseError::EventTooLarge {
                size: 11,
                limit: 10
            })
        );
        assert!(out.is_empty());
        // Invalid bytes grow when replaced: 4 x 0xFF is 12 bytes decoded.
        let mut parser = Parser::new(limits(100, 10));
        assert_eq!(
            parser.push(b"data: \xFF\xFF\xFF\xFF\n\n", &mut out),
            Err(ParseError::EventTooLarge {
                size: 12,
                limit: 10
            })
        );
    }

    #[test]
    fn error_is_sticky_until_new_stream() {
        let mut parser = Parser::new(limits(8, 100));
        let mut out = Vec::new();
        let err = ParseError::LineTooLong { size: 9, limit: 8 };
        assert_eq!(parser.push(b"123456789", &mut out), Err(err.clone()));
        assert_eq!(parser.push(b"\ndata: a\n\n", &mut out), Err(err));
        assert!(out.is_empty());
        parser.start_stream("");
        assert_eq!(push_ok(&mut parser, b"data: a\n\n"), vec![msg("a")]);
        assert_eq!(
            err_string(ParseError::EventTooLarge { size: 3, limit: 2 }),
            "an event of at least 3 bytes exceeds the limit of 2 bytes (max_event_size)"
        );
    }

    fn err_string(err: ParseError) -> String {
        err.to_string()
    }

    #[test]
    fn huge_line_in_64k_chunks_is_refused_early_with_bounded_memory() {
        const LIMIT: usize = 1024 * 1024;
        const CHUNK: usize = 64 * 1024;
        const TOTAL: usize = 100 * 1024 * 1024;
        let chunk = vec![b'a'; CHUNK];
        let mut parser = Parser::new(limits(LIMIT, LIMIT));
        let mut out = Vec::new();
        let mut fed = 0;
        let err = loop {
            assert!(fed < TOTAL, "the 100 MB line was never refused");
            match parser.push(&chunk, &mut out) {
                Ok(()) => fed += CHUNK,
                Err(err) => break err,
            }
            assert!(
                parser.line_capacity() <= LIMIT,
                "buffer grew to {}",
                parser.line_capacity()
            );
        };
        // Refused at the first chunk that takes the line past the limit.
        assert_eq!(fed, LIMIT);
        assert_eq!(
            err,
            ParseError::LineTooLong {
                size: LIMIT + CHUNK,
                limit: LIMIT
            }
        );
        assert!(parser.line_capacity() <= LIMIT);
        assert!(out.is_empty());
        // Fed as one huge slice it is refused without copying anything.
        let mut parser = Parser::new(limits(LIMIT, LIMIT));
        let huge = vec![b'a'; 4 * LIMIT];
        assert_eq!(
            parser.push(&huge, &mut out),
            Err(ParseError::LineTooLong {
                size: 4 * LIMIT,
                limit: LIMIT
            })
        );
        assert_eq!(parser.line_capacity(), 0);
    }

    // ---- the standard's examples ("Interpreting an event stream") -------------------------

    #[test]
    fn spec_example_stock_ticker() {
        assert_eq!(
            items(b"data: YHOO\ndata: +2\ndata: 10\n\n"),
            vec![msg("YHOO\n+2\n10")]
        );
    }

    #[test]
    fn spec_example_ids_and_comments() {
        let outcome = run(&[
            b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n",
        ]);
        assert_eq!(
            outcome.items,
            vec![
                ev("message", "first event", "1"),
                ev("message", "second event", "")
            ]
        );
        assert_eq!(outcome.last_event_id, "");
    }

    #[test]
    fn spec_example_empty_data() {
        assert_eq!(
            items(b"data\n\ndata\ndata\n\ndata:"),
            vec![msg(""), msg("\n")]
        );
    }

    #[test]
    fn spec_example_spacing() {
        assert_eq!(
            items(b"data:test\n\ndata: test\n\n"),
            vec![msg("test"), msg("test")]
        );
    }

    #[test]
    fn spec_example_event_types() {
        assert_eq!(
            items(b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"),
            vec![ev("add", "73857293", ""), ev("remove", "2153", ""), ev("add", "113411", "")]
        );
    }

    // ---- any split gives the same result ---------------------------------------------------

    /// Hand-written streams that exercise every rule.
    fn corpus() -> Vec<Vec<u8>> {
        let mut streams: Vec<Vec<u8>> = vec![
            b"\xEF\xBB\xBFdata: bom\r\n\r\n".to_vec(),
            "\u{FEFF}\u{FEFF}data: x\n\ndata: y\n\n".as_bytes().to_vec(),
            b"\xEF\xBBdata: a\n\xEF\n\ndata: b\r\r".to_vec(),
            b"data: a\r\ndata: b\rdata: c\n\r\n\r\r".to_vec(),
            b"data\n\ndata\ndata\n\ndata:".to_vec(),
            b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n"
                .to_vec(),
            "event: é\ndata: é€😀\r\nid: 😀\r\n\r\n".as_bytes().to_vec(),
            b"data: \xFF\xE2\x82\r\xF0\x9F\x98\n\xED\xA0\x80x\xC0\x80\n\n".to_vec(),
            b"id: 1\n\nid: 2\x00\n\nid:\n\nid: 3\ndata: a\n\n\n".to_vec(),
            b"retry: 1a\nretry: 5000\r\nretry:\rretry: 99999999999999999999999\nretry: 7\n".to_vec(),
            b"Data: x\nfoo\n:data: y\nevent: t\n\ndata: z\n\nevent: u\ndata:  w\ndata:\n\n".to_vec(),
            b"data: unfinished\nid: 9".to_vec(),
            b"\r\n\r\n\n\r:\r\n".to_vec(),
        ];
        let long: Vec<u8> = streams.concat();
        streams.push(long);
        streams
    }

    #[test]
    fn reference_agrees_on_corpus() {
        for stream in corpus() {
            assert_eq!(
                run(&[&stream]),
                reference(&stream),
                "{:?}",
                String::from_utf8_lossy(&stream)
            );
        }
    }

    #[test]
    fn every_split_gives_same_result() {
        for stream in corpus() {
            let whole = run(&[&stream]);
            for i in 0..=stream.len() {
                let (a, b) = stream.split_at(i);
                assert_eq!(
                    run(&[a, b]),
                    whole,
                    "split at {i} of {:?}",
                    String::from_utf8_lossy(&stream)
                );
            }
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(run(&bytes), whole, "byte at a time");
            // With empty chunks interleaved.
            let with_empties: Vec<&[u8]> = stream.chunks(1).flat_map(|c| [c, &[][..]]).collect();
            assert_eq!(
                run(&with_empties),
                whole,
                "byte at a time with empty chunks"
            );
        }
    }

    #[test]
    fn every_pair_of_splits_gives_same_result() {
        for stream in corpus().into_iter().filter(|s| s.len() <= 80) {
            let whole = run(&[&stream]);
            for i in 0..=stream.len() {
                for j in i..=stream.len() {
                    let chunks = [&stream[..i], &stream[i..j], &stream[j..]];
                    assert_eq!(run(&chunks), whole, "splits at {i},{j}");
                }
            }
        }
    }

    #[test]
    fn splits_agree_on_errors_and_earlier_items() {
        // With small limits, every split reports the same kind of error after the same items.
        for stream in corpus() {
            for lim in [limits(6, 100), limits(100, 5), limits(12, 8)] {
                let whole = run_with(lim, &[&stream]);
                for i in 0..=stream.len() {
                    let (a, b) = stream.split_at(i);
                    assert_eq!(run_with(lim, &[a, b]), whole, "split at {i}, {lim:?}");
                }
                let bytes: Vec<&[u8]> = stream.chunks(1).collect();
                assert_eq!(run_with(lim, &bytes), whole, "byte at a time, {lim:?}");
            }
        }
    }

    fn fragment() -> impl Strategy<Value = &'static [u8]> {
        prop::sample::select(vec![
            &b"data"[..],
            b"data:",
            b"data: ",
            b"event:",
            b"event: ",
            b"id:",
            b"id: ",
            b"retry:",
            b"retry: ",
            b"12",
            b"99999999999999999999999",
            b"Data",
            b"foo",
            b":",
            b" ",
            b"x",
            b"message",
            b"\n",
            b"\n",
            b"\n\n",
            b"\r",
            b"\r\n",
            b"\xEF\xBB\xBF",
            b"\xEF\xBB",
            "é".as_bytes(),
            "€".as_bytes(),
            "😀".as_bytes(),
            b"\xFF",
            b"\xE2\x82",
            b"\xF0\x9F",
            b"\xC0\x80",
            b"\x00",
        ])
    }

    fn stream_and_cuts() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
        (
            prop::collection::vec(fragment(), 0..60).prop_map(|parts| parts.concat()),
            prop::collection::vec(any::<usize>(), 0..12),
        )
            .prop_map(|(stream, cuts)| {
                let mut cuts: Vec<usize> =
                    cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
                cuts.sort_unstable();
                (stream, cuts)
            })
    }

    fn chunked<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut chunks = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            chunks.push(&stream[start..cut]);
            start = cut;
        }
        chunks.push(&stream[start..]);
        chunks
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_chunking_matches_single_push_and_reference((stream, cuts) in stream_and_cuts()) {
            let whole = run(&[&stream]);
            prop_assert_eq!(&whole, &reference(&stream));
            prop_assert_eq!(run(&chunked(&stream, &cuts)), whole);
        }

        #[test]
        fn random_chunking_with_small_limits_matches_single_push(
            (stream, cuts) in stream_and_cuts(),
            line in 0usize..24,
            event in 0usize..24,
        ) {
            let lim = limits(line, event);
            prop_assert_eq!(run_with(lim, &chunked(&stream, &cuts)), run_with(lim, &[&stream]));
        }
    }

    /// Throughput check, not run by default:
    /// `cargo test --release --lib sse::parser::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn throughput() {
        let one = b"id: 1234567890\nevent: price-update\ndata: {\"symbol\":\"ACME\",\"price\":123.45,\"volume\":100000,\"ts\":\"2024-01-01T00:00:00.000Z\",\"exchange\":\"XNAS\",\"flags\":[\"a\",\"b\",\"c\"],\"note\":\"lorem ipsum dolor sit amet consectetur\"}\n\n";
        let mut stream = Vec::new();
        while stream.len() < 64 * 1024 * 1024 {
            stream.extend_from_slice(one);
        }
        let events = stream.len() / one.len();
        let mut parser = Parser::new(Limits::default());
        let mut out = Vec::with_capacity(1024);
        let mut count = 0;
        let start = std::time::Instant::now();
        for chunk in stream.chunks(64 * 1024) {
            parser.push(chunk, &mut out).expect("valid stream");
            count += out.len();
            out.clear();
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(count, events);
        println!(
            "{} events of {} bytes: {:.2} M events/s, {:.0} MB/s",
            events,
            one.len(),
            events as f64 / secs / 1e6,
            stream.len() as f64 / secs / 1e6
        );
    }
}
