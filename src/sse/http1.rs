//! The wire format of the stream transport: an HTTP/1.1 request head, the response head
//! (parsed with `httparse`) and the body framings (chunked, `Content-Length`, read to EOF).
//! No policy here (redirects, timeouts and classification are [`super::connection`]'s).
//!
//! Why not reqwest/hyper for the event stream: an idle feed is an open connection that
//! receives a heartbeat comment every few seconds, and 10 000 of them must fit in 256 MiB
//! (issue 5). hyper keeps, per connection, an 8 KiB read buffer (two while the response headers
//! it parsed still point into the first), an 8 KiB write buffer, a request channel whose first
//! block holds 32 request slots (about 9 KiB) and a connection task: about 40 KiB of heap per
//! feed, measured with heaptrack. This reader owns no buffer while a quiet connection waits:
//! [`BodyReader`] allocates its read buffer when a read is polled and frees it when the socket
//! has nothing to give (`Poll::Pending`) after a small read (a heartbeat, a trickle), so an
//! idle connection holds only the socket and a few words of framing state. A busy stream keeps
//! its buffer between reads (freeing it at every pause cost CPU in the allocator), reads up to
//! 256 KiB at a time, and hands chunked data out chunk by chunk without copying it, as hyper
//! did.
//!
//! HTTP/1.1 only: an event stream is one long response, which HTTP/2 would not make faster,
//! and TLS offers ALPN `http/1.1` alone so that servers never pick HTTP/2.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Largest response head accepted (status line and headers); hyper's default limit is larger,
/// but an event stream's head is a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header fields accepted in a response head (hyper's default).
const MAX_HEADERS: usize = 100;

/// First size of a body read buffer; doubled after every read that fills it, up to
/// [`MAX_READ`], and halved after a read that fills less than a quarter: a busy stream is read
/// in large pieces (with 64 KiB reads a busy feed made six times as many system calls as
/// hyper, whose buffer grows to about 400 KiB), a quiet one in small ones. Only a stream that
/// is being read holds the buffer (see [`BodyReader::poll_fill`]).
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

/// A connection to the server: plain TCP, or TLS over TCP (boxed: rustls' connection state is
/// about 1 KiB, which plain connections should not pay for).
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "Stream::Plain",
            Stream::Tls(_) => "Stream::Tls",
        })
    }
}

/// Writes a whole request head and flushes it.
pub async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// The parts of a response head the transport uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_type: Option<HeaderText>,
    pub location: Option<HeaderText>,
    pub retry_after: Option<HeaderText>,
    /// `Content-Encoding`, when the server sent one.
    pub content_encoding: Option<HeaderText>,
    /// The `Transfer-Encoding` codings other than `chunked`, in order (lower case): the
    /// transport decodes none of them.
    pub transfer_codings: Vec<String>,
    pub framing: Framing,
}

/// A header value: its text when it is visible ASCII (what `HeaderValue::to_str` accepts),
/// else `NotText`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderText {
    Text(String),
    NotText,
}

impl HeaderText {
    fn new(bytes: &[u8]) -> HeaderText {
        match std::str::from_utf8(bytes) {
            Ok(s) if s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) => {
                HeaderText::Text(s.trim().to_string())
            }
            _ => HeaderText::NotText,
        }
    }

    /// The text, if the value is text.
    pub fn text(&self) -> Option<&str> {
        match self {
            HeaderText::Text(s) => Some(s),
            HeaderText::NotText => None,
        }
    }
}

/// How the body of a response ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    /// Neither: the body runs until the server closes the connection.
    Eof,
}

/// Parses a response head from the start of `buf`: `Ok(None)` when it is not complete yet,
/// else the head and its length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid HTTP response head: {e}")),
    };
    let status = response.code.unwrap_or_default();
    let mut head = Head {
        status,
        content_type: None,
        location: None,
        retry_after: None,
        content_encoding: None,
        transfer_codings: Vec::new(),
        framing: Framing::Eof,
    };
    let mut chunked = false;
    let mut transfer_encoded = false;
    let mut length: Option<u64> = None;
    for h in response.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-type") {
            head.content_type.get_or_insert(HeaderText::new(h.value));
        } else if name.eq_ignore_ascii_case("location") {
            head.location.get_or_insert(HeaderText::new(h.value));
        } else if name.eq_ignore_ascii_case("retry-after") {
            head.retry_after.get_or_insert(HeaderText::new(h.value));
        } else if name.eq_ignore_ascii_case("content-encoding") {
            head.content_encoding
                .get_or_insert(HeaderText::new(h.value));
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // The codings of every Transfer-Encoding field, in order; the last one decides
            // whether the body is chunked (RFC 9112 §6.3).
            let value = match HeaderText::new(h.value) {
                HeaderText::Text(v) => v,
                HeaderText::NotText => {
                    return Err("invalid HTTP response head: Transfer-Encoding is not text".into())
                }
            };
            for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                transfer_encoded = true;
                chunked = coding.eq_ignore_ascii_case("chunked");
                if !chunked {
                    head.transfer_codings.push(coding.to_ascii_lowercase());
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| "invalid HTTP response head: invalid Content-Length".to_string())?;
            if length.is_some_and(|l| l != value) {
                return Err(
                    "invalid HTTP response head: conflicting Content-Length headers".into(),
                );
            }
            length = Some(value);
        }
    }
    // RFC 9112 §6.3: with Transfer-Encoding, chunked as the final coding frames the body;
    // any other final coding means the body runs until the connection closes, whatever a
    // Content-Length says.
    head.framing = if chunked {
        Framing::Chunked
    } else if transfer_encoded {
        Framing::Eof
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        Framing::Eof
    };
    Ok(Some((head, len)))
}

/// Reads a response head from `stream`. Returns it with the bytes read after it (the start of
/// the body). Informational answers (1xx) are skipped, as hyper does.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Head, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        if let Some((head, len)) = parse_head(&buf)? {
            buf.drain(..len);
            if (100..200).contains(&head.status) && head.status != 101 {
                continue;
            }
            // Only the bytes: the head's buffer would otherwise stay with the connection.
            let early = if buf.is_empty() {
                Vec::new()
            } else {
                buf.clone()
            };
            return Ok((head, early));
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(format!(
                "the response head is larger than {} KiB",
                MAX_HEAD_BYTES / 1024
            ));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().min(MAX_HEAD_BYTES));
        }
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "the server closed the connection without answering".into()
            } else {
                "the server closed the connection in the middle of the response head".into()
            });
        }
    }
}

/// Decodes `Transfer-Encoding: chunked` in place, on arbitrary splits of the input.
///
/// Chunk extensions and trailer fields are skipped. Line ends are CRLF; a bare LF is accepted
/// too (as curl does), a CR elsewhere in a size line is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In the hex digits of a chunk size (`digits` so far).
    Size {
        size: u64,
        digits: u8,
    },
    /// After the digits: optional whitespace, then `;` extensions, up to the line end.
    SizeRest {
        size: u64,
        ext: bool,
    },
    /// Saw CR at the end of a size line; LF must follow.
    SizeLf {
        size: u64,
    },
    /// Inside chunk data.
    Data {
        remaining: u64,
    },
    /// After chunk data: CRLF (or LF) must follow.
    DataEnd {
        cr: bool,
    },
    /// After the last chunk: trailer lines until an empty one. `empty`: the current line has
    /// no bytes so far.
    Trailer {
        empty: bool,
    },
    Done,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size { size: 0, digits: 0 },
        }
    }
}

impl ChunkedDecoder {
    /// Whether the last chunk and the trailer have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from the start of `input` up to the end of the first piece of chunk data (or
    /// to the end of `input`): returns how many bytes it used and where that data lies in
    /// `input`. The data is not copied: a read of many chunks hands them out one by one, as
    /// hyper did. Bytes after the end of the body are not used.
    pub fn next(&mut self, input: &[u8]) -> Result<(usize, Option<(usize, usize)>), String> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Data { remaining } => {
                    let take =
                        (input.len() - i).min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let remaining = remaining - take as u64;
                    self.state = if remaining == 0 {
                        ChunkState::DataEnd { cr: false }
                    } else {
                        ChunkState::Data { remaining }
                    };
                    return Ok((i + take, Some((i, i + take))));
                }
                ChunkState::Done => break,
                _ => {
                    self.step(input[i])?;
                    i += 1;
                }
            }
        }
        Ok((i, None))
    }

    /// One byte outside chunk data.
    fn step(&mut self, b: u8) -> Result<(), String> {
        let bad = |what: &str| {
            Err(format!(
                "malformed chunked body: {what} (byte {:?})",
                char::from(b)
            ))
        };
        self.state = match self.state {
            ChunkState::Size { size, digits } => match hex(b) {
                Some(d) if digits < 16 => ChunkState::Size {
                    size: size << 4 | u64::from(d),
                    digits: digits + 1,
                },
                Some(_) => return Err("malformed chunked body: chunk size too large".into()),
                None if digits == 0 => return bad("expected a hexadecimal chunk size"),
                None => ChunkedDecoder::size_rest(size, false, b)?,
            },
            ChunkState::SizeRest { size, ext } => ChunkedDecoder::size_rest(size, ext, b)?,
            ChunkState::SizeLf { size } => match b {
                b'\n' => ChunkedDecoder::after_size_line(size),
                _ => return bad("expected LF after CR in a chunk size line"),
            },
            ChunkState::DataEnd { cr } => match b {
                b'\r' if !cr => ChunkState::DataEnd { cr: true },
                b'\n' => ChunkState::Size { size: 0, digits: 0 },
                _ => return bad("expected CRLF after chunk data"),
            },
            ChunkState::Trailer { empty } => match b {
                b'\n' if empty => ChunkState::Done,
                b'\n' => ChunkState::Trailer { empty: true },
                b'\r' => ChunkState::Trailer { empty },
                _ => ChunkState::Trailer { empty: false },
            },
            state @ (ChunkState::Data { .. } | ChunkState::Done) => state,
        };
        Ok(())
    }

    /// A byte after the digits of a size line.
    fn size_rest(size: u64, ext: bool, b: u8) -> Result<ChunkState, String> {
        Ok(match b {
            b'\r' => ChunkState::SizeLf { size },
            b'\n' => ChunkedDecoder::after_size_line(size),
            b';' => ChunkState::SizeRest { size, ext: true },
            b' ' | b'\t' => ChunkState::SizeRest { size, ext },
            _ if ext => ChunkState::SizeRest { size, ext },
            _ => {
                return Err(format!(
                    "malformed chunked body: invalid character {:?} in a chunk size line",
                    char::from(b)
                ))
            }
        })
    }

    fn after_size_line(size: u64) -> ChunkState {
        if size == 0 {
            ChunkState::Trailer { empty: true }
        } else {
            ChunkState::Data { remaining: size }
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// How a body read ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// The socket failed (reset, broken pipe, TLS alert).
    Io(String),
    /// The connection closed before the framing said the body ends.
    Truncated(String),
    /// The chunked framing is malformed.
    Malformed(String),
}

/// The body of an accepted response, read piece by piece.
#[derive(Debug)]
pub struct BodyReader {
    stream: Stream,
    framing: BodyFraming,
    /// The read buffer: `buf[pos..]` is read but not yet decoded. Without capacity while the
    /// connection waits for a trickling stream (see [`BodyReader::poll_fill`]).
    buf: Vec<u8>,
    pos: usize,
    /// The next read's size.
    read_size: usize,
    /// The size of the last socket read.
    last_read: usize,
    /// Body bytes that arrived with the response head, not yet handed out.
    early: Vec<u8>,
    /// Where in `buf` the body bytes of the last [`BodyReader::read`] are.
    data: (usize, usize),
}

#[derive(Debug)]
enum BodyFraming {
    Chunked(ChunkedDecoder),
    Length {
        remaining: u64,
    },
    Eof,
    /// The body has ended.
    Finished,
}

impl BodyReader {
    pub fn new(stream: Stream, framing: Framing, early: Vec<u8>) -> BodyReader {
        BodyReader {
            stream,
            framing: match framing {
                Framing::Chunked => BodyFraming::Chunked(ChunkedDecoder::default()),
                Framing::Length(0) => BodyFraming::Finished,
                Framing::Length(remaining) => BodyFraming::Length { remaining },
                Framing::Eof => BodyFraming::Eof,
            },
            buf: Vec::new(),
            pos: 0,
            read_size: MIN_READ,
            last_read: 0,
            early,
            data: (0, 0),
        }
    }

    /// The body bytes of the last successful [`BodyReader::read`].
    pub fn data(&self) -> &[u8] {
        &self.buf[self.data.0..self.data.1]
    }

    /// The next piece of the body: `Some(n)` when bytes were read or decoded, of which `n` are
    /// body data (see [`BodyReader::data`]; 0 when they were only chunk framing), `None` at the
    /// end of the body. Reads the socket only when everything read before is decoded.
    /// Cancel-safe: a read that is dropped before it completes loses no bytes.
    pub async fn read(&mut self) -> Result<Option<usize>, BodyError> {
        self.data = (0, 0);
        if matches!(self.framing, BodyFraming::Finished) {
            return Ok(None);
        }
        if self.pos == self.buf.len() {
            if !self.early.is_empty() {
                self.buf = std::mem::take(&mut self.early);
            } else {
                let n = poll_fn(|cx| self.poll_fill(cx)).await?;
                if n == 0 {
                    return match std::mem::replace(&mut self.framing, BodyFraming::Finished) {
                        BodyFraming::Eof | BodyFraming::Finished => Ok(None),
                        BodyFraming::Length { remaining } => Err(BodyError::Truncated(format!(
                            "the server closed the connection {remaining} bytes before the end of the body (Content-Length)"
                        ))),
                        BodyFraming::Chunked(_) => Err(BodyError::Truncated(
                            "the server closed the connection before the end of the chunked body"
                                .into(),
                        )),
                    };
                }
            }
            self.pos = 0;
        }
        let (start, end) = (self.pos, self.buf.len());
        let data = match &mut self.framing {
            BodyFraming::Chunked(decoder) => {
                let (used, data) = decoder
                    .next(&self.buf[start..end])
                    .map_err(BodyError::Malformed)?;
                self.pos = start + used;
                if decoder.is_done() {
                    self.framing = BodyFraming::Finished;
                }
                data.map_or((start, start), |(a, b)| (start + a, start + b))
            }
            BodyFraming::Length { remaining } => {
                let take = (end - start).min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= take as u64;
                if *remaining == 0 {
                    self.framing = BodyFraming::Finished;
                }
                self.pos = end;
                (start, start + take)
            }
            BodyFraming::Eof => {
                self.pos = end;
                (start, end)
            }
            BodyFraming::Finished => (start, start),
        };
        self.data = data;
        Ok(Some(data.1 - data.0))
    }

    /// Polls one socket read (everything read before is decoded). The buffer is allocated
    /// for the read and, when the socket has nothing to give (`Pending`) and the last read was
    /// small (under [`MIN_READ`]: heartbeats, a trickle), freed: the connection then holds no
    /// buffer while it waits. A stream whose reads are large keeps its buffer between reads:
    /// freeing and allocating up to [`MAX_READ`] per read cost a busy feed about a third more
    /// CPU per event in the allocator. (`poll_read` that returns `Pending` has filled nothing,
    /// so dropping the buffer loses nothing.) The buffer is never zeroed: `poll_read_buf` reads
    /// into its spare capacity.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, BodyError>> {
        if self.buf.capacity() < self.read_size {
            self.buf = Vec::with_capacity(self.read_size);
        }
        self.buf.clear();
        self.pos = 0;
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf) {
            Poll::Pending => {
                if self.last_read < MIN_READ {
                    self.buf = Vec::new();
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                self.buf = Vec::new();
                Poll::Ready(Err(BodyError::Io(e.to_string())))
            }
            Poll::Ready(Ok(n)) => {
                self.last_read = n;
                if n == self.read_size && self.read_size < MAX_READ {
                    self.read_size *= 2;
                } else if n < self.read_size / 4 && self.read_size > MIN_READ {
                    self.read_size /= 2;
                }
                Poll::Ready(Ok(n))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` cut at `cuts`, returning the data and whether the body ended.
    fn decode_split(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), String> {
        let mut decoder = ChunkedDecoder::default();
        let mut out = Vec::new();
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.iter().copied().filter(|&c| c < input.len()).collect();
        bounds.sort_unstable();
        bounds.push(input.len());
        for end in bounds {
            let mut piece = &input[start..end];
            while !piece.is_empty() {
                let (used, data) = decoder.next(piece)?;
                if let Some((a, b)) = data {
                    out.extend_from_slice(&piece[a..b]);
                }
                if used == 0 {
                    break;
                }
                piece = &piece[used..];
            }
            start = end;
        }
        Ok((out, decoder.is_done()))
    }

    #[test]
    fn chunked_decodes_on_every_split() {
        let input =
            b"5\r\nhello\r\n1;ext=1\r\n \r\nA \r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\nafter";
        let want = b"hello 0123456789".to_vec();
        assert_eq!(decode_split(input, &[]).unwrap(), (want.clone(), true));
        for i in 0..input.len() {
            assert_eq!(
                decode_split(input, &[i]).unwrap(),
                (want.clone(), true),
                "cut {i}"
            );
            for j in i..input.len() {
                assert_eq!(
                    decode_split(input, &[i, j]).unwrap(),
                    (want.clone(), true),
                    "cuts {i} {j}"
                );
            }
        }
        // Byte by byte.
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(decode_split(input, &every).unwrap(), (want, true));
    }

    #[test]
    fn chunked_accepts_bare_lf_and_upper_case_hex() {
        let (data, done) =
            decode_split(b"1F\nabcdefghijklmnopqrstuvwxyz01234\n0\n\n", &[]).unwrap();
        assert_eq!(data, b"abcdefghijklmnopqrstuvwxyz01234");
        assert!(done);
    }

    #[test]
    fn chunked_without_the_last_chunk_is_not_done() {
        let (data, done) = decode_split(b"3\r\nabc\r\n", &[2]).unwrap();
        assert_eq!(data, b"abc");
        assert!(!done);
    }

    #[test]
    fn malformed_chunk_sizes_are_errors() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5x\r\nhello\r\n",
            b"5\rhello",
            b"3\r\nabcX\r\n",
            b"11111111111111111\r\n",
        ] {
            let e = decode_split(bad, &[]).unwrap_err();
            assert!(e.starts_with("malformed chunked body"), "{bad:?}: {e}");
            for i in 0..bad.len() {
                assert_eq!(
                    decode_split(bad, &[i]).unwrap_err(),
                    e,
                    "{bad:?} cut at {i}"
                );
            }
        }
        // Sixteen hex digits are the most a u64 holds.
        assert!(decode_split(b"000000000000000F\r\n", &[]).is_ok());
    }

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\nbody";
        let (head, len) = parse_head(raw).unwrap().unwrap();
        assert_eq!(len, raw.len() - 4);
        assert_eq!(head.status, 200);
        assert_eq!(
            head.content_type,
            Some(HeaderText::Text("text/event-stream".into()))
        );
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(head.transfer_codings, vec!["gzip".to_string()]);
        assert_eq!(head.content_encoding, None);

        // A final coding other than chunked: read until close, Content-Length ignored.
        let (head, _) = parse_head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: GZip\r\nContent-Length: 5\r\nContent-Encoding: br\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.framing, Framing::Eof);
        assert_eq!(head.transfer_codings, vec!["gzip".to_string()]);
        assert_eq!(head.content_encoding, Some(HeaderText::Text("br".into())));

        let (head, _) =
            parse_head(b"HTTP/1.1 302 Found\r\nlocation: /next\r\ncontent-length: 0\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(head.location, Some(HeaderText::Text("/next".into())));
        assert_eq!(head.framing, Framing::Length(0));

        let (head, _) = parse_head(b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.retry_after, Some(HeaderText::Text("7".into())));
        assert_eq!(head.framing, Framing::Eof);

        let (head, _) = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/\xffx\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.content_type, Some(HeaderText::NotText));

        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Ty").unwrap(), None);
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn read_head_skips_informational_answers_and_keeps_early_body_bytes() {
        let raw: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: x\n\n";
        let mut reader = raw;
        let (head, early) = read_head(&mut reader).await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(early, b"data: x\n\n");
        let mut cut: &[u8] = b"HTTP/1.1 200 OK\r\nContent-";
        assert!(read_head(&mut cut)
            .await
            .unwrap_err()
            .contains("middle of the response head"));
    }

    #[tokio::test]
    async fn a_busy_stream_keeps_its_buffer_and_a_trickle_frees_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut body = BodyReader::new(Stream::Plain(client), Framing::Eof, Vec::new());
        let wait = std::time::Duration::from_millis(20);
        write_all(&mut server, &[b'x'; 3 * MIN_READ]).await.unwrap();
        let mut got = 0;
        while got < 3 * MIN_READ {
            got += body.read().await.unwrap().unwrap();
        }
        // Large reads: waiting keeps the buffer for the next burst.
        assert!(tokio::time::timeout(wait, body.read()).await.is_err());
        assert!(body.buf.capacity() >= MIN_READ);
        write_all(&mut server, b": heartbeat\n").await.unwrap();
        assert_eq!(body.read().await.unwrap(), Some(12));
        // A small read: waiting frees it.
        assert!(tokio::time::timeout(wait, body.read()).await.is_err());
        assert_eq!(body.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn body_reader_frees_its_buffer_while_waiting_and_reads_each_framing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut body =
            BodyReader::new(Stream::Plain(client), Framing::Chunked, b"4\r\nab".to_vec());
        assert_eq!(body.read().await.unwrap(), Some(2));
        assert_eq!(body.data(), b"ab");
        // Nothing to read: the pending read frees the buffer.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), body.read()).await;
        assert!(pending.is_err());
        assert_eq!(body.buf.capacity(), 0);
        write_all(&mut server, b"cd\r\n0\r\n\r\n").await.unwrap();
        assert_eq!(body.read().await.unwrap(), Some(2));
        assert_eq!(body.data(), b"cd");
        // The last chunk and the trailer: framing only, then the end.
        assert_eq!(body.read().await.unwrap(), Some(0));
        assert_eq!(body.read().await.unwrap(), None);

        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut body = BodyReader::new(Stream::Plain(client), Framing::Length(10), Vec::new());
        write_all(&mut server, b"12345").await.unwrap();
        drop(server);
        assert_eq!(body.read().await.unwrap(), Some(5));
        assert_eq!(body.data(), b"12345");
        match body.read().await {
            Err(BodyError::Truncated(m)) => assert!(m.contains("5 bytes before"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
