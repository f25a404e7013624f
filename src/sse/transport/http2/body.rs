//! The body of an HTTP/2 response: the stream's DATA frames, with flow-control window given
//! back only as the feed takes the bytes (so a feed that stops reading stops only its own
//! stream, ARCHITECTURE.md §3).

use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::Slot;
use crate::sse::transport::{Body, BodyError, TransportError};

/// A stream's body; holds its connection slot until dropped.
pub struct H2Body {
    recv: h2::RecvStream,
    _slot: Slot,
}

impl H2Body {
    pub fn new(recv: h2::RecvStream, slot: Slot) -> Self {
        H2Body { recv, _slot: slot }
    }
}

impl fmt::Debug for H2Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Body")
            .field("connection", &self._slot.connection())
            .finish_non_exhaustive()
    }
}

impl Body for H2Body {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, TransportError>> {
        match self.recv.poll_data(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Ok(None)),
            Poll::Ready(Some(Ok(bytes))) => {
                // The bytes are the feed's now: the server may send as many again.
                let _ = self.recv.flow_control().release_capacity(bytes.len());
                Poll::Ready(Ok(Some(bytes)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(BodyError::Http2(e).into())),
        }
    }
}
