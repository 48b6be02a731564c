//! One tunnel's HTTP/2 stream, driven through the `h2` crate directly.
//!
//! Received DATA frames come out as the `Bytes` the HTTP/2 codec parsed
//! them into, and bytes to send go in as `Bytes` that the codec writes to
//! TLS as they are: the relay ([`super::copy::copy_tunnel`]) moves them
//! between the app's socket and the stream with no copy in between (hyper's
//! upgrade copied each byte once more each way). [`AsyncRead`] and
//! [`AsyncWrite`] are there too, for callers that hold a tunnel as a plain
//! byte stream; they copy like any reader or writer.
//!
//! Flow control: a received chunk's window is given back when the chunk is
//! handed out, so the peer may have one stream window in flight plus the
//! one chunk the relay is writing. Sending waits for capacity, which `h2`
//! assigns from the peer's window up to its send buffer size
//! ([`super::H2Config::max_send_buf_size`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Both halves of one HTTP/2 stream as a byte stream, with counts of what
/// went each way.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received, not yet read through [`AsyncRead`].
    pending: Bytes,
    recv_done: bool,
    send_done: bool,
    /// Bytes received from the peer.
    pub(crate) read: u64,
    /// Bytes sent to the peer.
    pub(crate) written: u64,
    /// Set to the ms since the instant whenever bytes move.
    activity: Option<(Instant, Arc<AtomicU64>)>,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
            send_done: false,
            read: 0,
            written: 0,
            activity: None,
        }
    }

    /// Notes in `last` (ms since `start`) when bytes last moved.
    pub(crate) fn track_activity(&mut self, start: Instant, last: Arc<AtomicU64>) {
        self.activity = Some((start, last));
    }

    fn moved(&self) {
        if let Some((start, last)) = &self.activity {
            let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            last.store(ms, Ordering::Relaxed);
        }
    }

    /// The next received bytes, their window given back to the peer;
    /// `None` once the peer ended the stream.
    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            if self.recv_done {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.recv.poll_data(cx)) {
                None => self.recv_done = true,
                Some(Ok(data)) => {
                    let n = data.len();
                    if n == 0 {
                        continue;
                    }
                    self.recv
                        .flow_control()
                        .release_capacity(n)
                        .map_err(h2_to_io)?;
                    self.read += n as u64;
                    self.moved();
                    return Poll::Ready(Ok(Some(data)));
                }
                // As hyper's upgrade did: a peer that cancels its side
                // (or resets it with no error) ends the stream.
                Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                    self.recv_done = true
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }

    /// Waits until the stream may send some of `want` (> 0) bytes now;
    /// returns how many.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.send_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
                // Closed or reset: the reset says why.
                None | Some(Err(_)) => return self.poll_reset_error(cx),
            }
        }
    }

    fn poll_reset_error<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        Poll::Ready(Err(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => h2_to_io(reason.into()),
            Err(e) => h2_to_io(e),
        }))
    }

    /// Sends up to all of `data` (advanced past what was taken), as much as
    /// the stream may send now; no copy.
    pub(crate) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_room(cx, data.len()))?;
        let chunk = data.split_to(n);
        self.send_chunk(cx, chunk, n)
    }

    fn send_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: Bytes,
        n: usize,
    ) -> Poll<io::Result<usize>> {
        if self.send.send_data(chunk, false).is_err() {
            return self.poll_reset_error(cx);
        }
        self.written += n as u64;
        self.moved();
        Poll::Ready(Ok(n))
    }

    /// Ends our side of the stream (END_STREAM).
    pub(crate) fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.send_done {
            return Poll::Ready(Ok(()));
        }
        if self.send.send_data(Bytes::new(), true).is_err() {
            return self.poll_reset_error(cx);
        }
        self.send_done = true;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(mut chunk) = ready!(this.poll_chunk(cx))? {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.advance(n);
            // An emptied slice would still hold the codec's buffer.
            if !chunk.is_empty() {
                this.pending = chunk;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_room(cx, buf.len()))?;
        this.send_chunk(cx, Bytes::copy_from_slice(&buf[..n]), n)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what was sent.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_finish(cx)
    }
}

/// An `h2` error as an I/O error: the underlying I/O error when there is
/// one, else the HTTP/2 error itself.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("hbone: HTTP/2 I/O error"))
    } else {
        io::Error::other(e)
    }
}
