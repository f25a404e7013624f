//! Response bodies: chunked, `Content-Length` and read-to-EOF framing, read into `Bytes` chunks.
//!
//! Why not reqwest/hyper for the event stream: an idle feed is an open connection that
//! receives a heartbeat comment every few seconds, and 10 000 of them must fit in 256 MiB
//! (ARCHITECTURE.md §8). hyper keeps, per connection, an 8 KiB read buffer (two while the
//! response headers it parsed still point into the first), an 8 KiB write buffer, a request
//! channel whose first block holds 32 request slots (about 9 KiB) and a connection task: about
//! 40 KiB of heap per feed, measured with heaptrack. This reader owns no buffer while a quiet
//! connection waits: [`BodyReader`] allocates its read buffer when a read is polled and frees it
//! when the socket has nothing to give (`Poll::Pending`) after a small read (a heartbeat, a
//! trickle), so an idle connection holds only the socket and a few words of framing state. A
//! busy stream keeps its buffer between reads (freeing it at every pause cost CPU in the
//! allocator), reads up to 256 KiB at a time, and hands data out as `Bytes` split off the read
//! buffer without copying it, chunk by chunk; once the caller dropped them, the next read
//! reuses the same allocation.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};

use super::super::connect::Stream;
use super::super::{Body, TransportError};
use super::head::Framing;

/// First size of a body read buffer; doubled after every read that fills it, up to
/// [`MAX_READ`], and halved after a read that fills less than a quarter: a busy stream is read
/// in large pieces (with 64 KiB reads a busy feed made six times as many system calls as
/// hyper, whose buffer grows to about 400 KiB), a quiet one in small ones. Only a stream that
/// is being read holds the buffer (see [`BodyReader::poll_fill`]).
pub const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

/// The chunked framing is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub struct MalformedChunk(String);

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
    pub fn next(
        &mut self,
        input: &[u8],
    ) -> Result<(usize, Option<(usize, usize)>), MalformedChunk> {
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
    fn step(&mut self, b: u8) -> Result<(), MalformedChunk> {
        let bad = |what: &str| Err(MalformedChunk(format!("{what} (byte {:?})", char::from(b))));
        self.state = match self.state {
            ChunkState::Size { size, digits } => match hex(b) {
                Some(d) if digits < 16 => ChunkState::Size {
                    size: size << 4 | u64::from(d),
                    digits: digits + 1,
                },
                Some(_) => return Err(MalformedChunk("chunk size too large".into())),
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
    fn size_rest(size: u64, ext: bool, b: u8) -> Result<ChunkState, MalformedChunk> {
        Ok(match b {
            b'\r' => ChunkState::SizeLf { size },
            b'\n' => ChunkedDecoder::after_size_line(size),
            b';' => ChunkState::SizeRest { size, ext: true },
            b' ' | b'\t' => ChunkState::SizeRest { size, ext },
            _ if ext => ChunkState::SizeRest { size, ext },
            _ => {
                return Err(MalformedChunk(format!(
                    "invalid character {:?} in a chunk size line",
                    char::from(b)
                )))
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
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The socket failed (reset, broken pipe, TLS alert).
    #[error("connection broken while reading the stream: {0}")]
    Io(#[source] std::io::Error),
    /// The connection closed before the framing said the body ends.
    #[error("connection broken while reading the stream: the server closed the connection {}", match .remaining { Some(n) => format!("{n} bytes before the end of the body (Content-Length)"), None => "before the end of the chunked body".to_string() })]
    Truncated {
        /// Bytes missing by `Content-Length`; `None` for a chunked body.
        remaining: Option<u64>,
    },
    /// The chunked framing is malformed.
    #[error("{0}; dropping the connection")]
    Malformed(#[source] MalformedChunk),
    /// The HTTP/2 stream or its connection failed (RST_STREAM, GOAWAY, a protocol error).
    #[error("connection broken while reading the stream: HTTP/2: {0}")]
    Http2(#[source] h2::Error),
}

/// The body of an accepted response, read piece by piece.
#[derive(Debug)]
pub struct BodyReader {
    stream: Stream,
    framing: BodyFraming,
    /// Read but not yet decoded. Without capacity while the connection waits for a trickling
    /// stream (see [`BodyReader::poll_fill`]).
    buf: BytesMut,
    /// The next read's size.
    read_size: usize,
    /// The size of the last socket read.
    last_read: usize,
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
    /// A body framed as `framing`, of which `early` arrived with the response head.
    pub fn new(stream: Stream, framing: Framing, early: Vec<u8>) -> BodyReader {
        BodyReader {
            stream,
            framing: match framing {
                Framing::Chunked => BodyFraming::Chunked(ChunkedDecoder::default()),
                Framing::Length(0) => BodyFraming::Finished,
                Framing::Length(remaining) => BodyFraming::Length { remaining },
                Framing::Eof => BodyFraming::Eof,
            },
            buf: if early.is_empty() {
                BytesMut::new()
            } else {
                BytesMut::from(&early[..])
            },
            read_size: MIN_READ,
            last_read: 0,
        }
    }

    /// [`Body::poll_chunk`] as a future (tests).
    pub async fn read(&mut self) -> Result<Option<Bytes>, BodyError> {
        std::future::poll_fn(|cx| self.poll_read_chunk(cx)).await
    }

    /// The next piece of the body: `Some(bytes)` when bytes were read or decoded (empty when
    /// they were only chunk framing), `None` at the end of the body. Reads the socket only when
    /// everything read before is decoded. Cancel-safe.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BodyError>> {
        if matches!(self.framing, BodyFraming::Finished) {
            return Poll::Ready(Ok(None));
        }
        if self.buf.is_empty() {
            let n = ready!(self.poll_fill(cx))?;
            if n == 0 {
                return Poll::Ready(
                    match std::mem::replace(&mut self.framing, BodyFraming::Finished) {
                        BodyFraming::Eof | BodyFraming::Finished => Ok(None),
                        BodyFraming::Length { remaining } => Err(BodyError::Truncated {
                            remaining: Some(remaining),
                        }),
                        BodyFraming::Chunked(_) => Err(BodyError::Truncated { remaining: None }),
                    },
                );
            }
        }
        let chunk = match &mut self.framing {
            BodyFraming::Chunked(decoder) => {
                let (used, data) = decoder.next(&self.buf).map_err(BodyError::Malformed)?;
                let chunk = match data {
                    Some((a, b)) => {
                        self.buf.advance(a);
                        let chunk = self.buf.split_to(b - a).freeze();
                        self.buf.advance(used - b);
                        chunk
                    }
                    None => {
                        self.buf.advance(used);
                        Bytes::new()
                    }
                };
                if decoder.is_done() {
                    self.framing = BodyFraming::Finished;
                    self.buf = BytesMut::new();
                }
                chunk
            }
            BodyFraming::Length { remaining } => {
                let take = self
                    .buf
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= take as u64;
                let chunk = self.buf.split_to(take).freeze();
                // Bytes after the end of the body are not the stream's.
                self.buf.clear();
                if *remaining == 0 {
                    self.framing = BodyFraming::Finished;
                }
                chunk
            }
            BodyFraming::Eof => self.buf.split().freeze(),
            BodyFraming::Finished => Bytes::new(),
        };
        Poll::Ready(Ok(Some(chunk)))
    }

    /// Polls one socket read (everything read before is decoded). The buffer is allocated
    /// for the read (or the last one's reclaimed, once the chunks split off it were dropped)
    /// and, when the socket has nothing to give (`Pending`) and the last read was small (under
    /// [`MIN_READ`]: heartbeats, a trickle), freed: the connection then holds no buffer while
    /// it waits. A stream whose reads are large keeps its buffer between reads: freeing and
    /// allocating up to [`MAX_READ`] per read cost a busy feed about a third more CPU per event
    /// in the allocator. (`poll_read` that returns `Pending` has filled nothing, so dropping the
    /// buffer loses nothing.) The buffer is never zeroed: `poll_read_buf` reads into its spare
    /// capacity.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, BodyError>> {
        self.buf.clear();
        if self.buf.capacity() < self.read_size && !self.buf.try_reclaim(self.read_size) {
            self.buf = BytesMut::with_capacity(self.read_size);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf) {
            Poll::Pending => {
                if self.last_read < MIN_READ {
                    self.buf = BytesMut::new();
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                self.buf = BytesMut::new();
                Poll::Ready(Err(BodyError::Io(e)))
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

impl Body for BodyReader {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, TransportError>> {
        self.poll_read_chunk(cx).map_err(TransportError::Body)
    }
}

#[cfg(test)]
mod tests {
    use super::super::head::write_all;
    use super::*;
    use tokio::net::TcpStream;

    /// Decodes `input` cut at `cuts`, returning the data and whether the body ended.
    fn decode_split(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), String> {
        decode_split_typed(input, cuts).map_err(|e| e.to_string())
    }

    fn decode_split_typed(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, bool), MalformedChunk> {
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
            got += body.read().await.unwrap().unwrap().len();
        }
        // Large reads: waiting keeps the buffer for the next burst.
        assert!(tokio::time::timeout(wait, body.read()).await.is_err());
        assert!(body.buf.capacity() >= MIN_READ);
        write_all(&mut server, b": heartbeat\n").await.unwrap();
        assert_eq!(body.read().await.unwrap().map(|b| b.len()), Some(12));
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
        assert_eq!(body.read().await.unwrap().as_deref(), Some(&b"ab"[..]));
        // Nothing to read: the pending read frees the buffer.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), body.read()).await;
        assert!(pending.is_err());
        assert_eq!(body.buf.capacity(), 0);
        write_all(&mut server, b"cd\r\n0\r\n\r\n").await.unwrap();
        assert_eq!(body.read().await.unwrap().as_deref(), Some(&b"cd"[..]));
        // The last chunk and the trailer: framing only, then the end.
        assert_eq!(body.read().await.unwrap().as_deref(), Some(&b""[..]));
        assert_eq!(body.read().await.unwrap(), None);

        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut body = BodyReader::new(Stream::Plain(client), Framing::Length(10), Vec::new());
        write_all(&mut server, b"12345").await.unwrap();
        drop(server);
        assert_eq!(body.read().await.unwrap().as_deref(), Some(&b"12345"[..]));
        match body.read().await {
            Err(e @ BodyError::Truncated { .. }) => {
                assert!(e.to_string().contains("5 bytes before"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
