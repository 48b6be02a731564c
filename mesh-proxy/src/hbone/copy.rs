//! Copying both ways between an app's socket and a tunnel, with buffers
//! that exist only while bytes are in flight.
//!
//! `tokio::io::copy_bidirectional` keeps two buffers of the copy size for
//! the whole life of a connection, and the pages a connection's first bytes
//! touched stay resident while it idles (measured: most of the ~35 KiB of
//! proxy RSS per idle tunnel). Here each direction takes its buffer when it
//! reads (uninitialised, so nothing is zeroed) and gives it back as soon as
//! everything read was written and the reader has nothing more: an idle
//! tunnel holds no buffer, and a busy one reuses the same allocation (an
//! emptied `BytesMut` reclaims its space in place). Both directions run in
//! the caller's task. Like tokio's copy: bytes are written in order, a
//! writer is flushed before the direction waits for its reader, and the
//! reader's EOF becomes a shutdown of the writer once all was written.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use super::stream::H2Stream;

/// The first buffer of a direction, and the one after an idle spell when
/// its last read did not fill what it had: a small size class of the
/// allocator (slab and thread cache: a 1 KiB request/response pays no
/// large allocation). Measured: 16 KiB (jemalloc's first large class)
/// cost ~+4 us on the cross-node 1 KiB round trip, 8 KiB nothing.
const SMALL: usize = 8 * 1024;

/// One direction.
struct Direction {
    buf: BytesMut,
    /// The largest buffer (the configured copy size).
    size: usize,
    /// What the next allocation asks for: `SMALL`, or `size` once a read
    /// filled the buffer it had (a bulk flow keeps large buffers).
    next: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    moved: u64,
}

impl Direction {
    fn new(size: usize) -> Self {
        Direction {
            buf: BytesMut::new(),
            size: size.max(1),
            next: SMALL.min(size.max(1)),
            read_done: false,
            need_flush: false,
            done: false,
            moved: 0,
        }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while self.buf.has_remaining() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, self.buf.chunk()))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.buf.advance(n);
                self.moved += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                self.buf = BytesMut::new();
                continue;
            }
            // Empty: an emptied buffer reclaims its whole allocation here
            // (no copy, no allocation); a released one allocates anew.
            self.buf.reserve(self.next);
            let room = self.buf.capacity();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(n)) => {
                    if n == room {
                        self.next = self.size;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    // Nothing in flight: give the buffer back while idle.
                    self.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies both ways between `a` and `b` until both directions ended (each
/// EOF passed on as a shutdown), with at most `size` bytes buffered per
/// direction. Returns `(a -> b, b -> a)` bytes; an error on either
/// direction ends both.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B, size: usize) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut ab, mut ba) = (Direction::new(size), Direction::new(size));
    poll_fn(|cx| {
        let x = ab.poll(cx, &mut *a, &mut *b);
        let y = ba.poll(cx, &mut *b, &mut *a);
        both_done(x, y, (ab.moved, ba.moved))
    })
    .await
}

/// Copies both ways between `a` (the app's socket) and a tunnel's HTTP/2
/// stream, like [`copy_bidirectional`] but handing the `h2` codec the
/// buffer read from `a` as it is, and writing each received DATA frame's
/// bytes to `a` from where the codec parsed them: no copy in between.
/// Returns `(a -> tunnel, tunnel -> a)` bytes.
pub async fn copy_tunnel<A>(a: &mut A, t: &mut H2Stream, size: usize) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut up, mut down) = (ToTunnel::new(size), FromTunnel::default());
    poll_fn(|cx| {
        let x = up.poll(cx, &mut *a, &mut *t);
        let y = down.poll(cx, &mut *t, &mut *a);
        both_done(x, y, (up.moved, down.moved))
    })
    .await
}

/// App socket -> tunnel: reads into a buffer sized as [`Direction`]'s,
/// whose filled part goes to `h2` as `Bytes`.
struct ToTunnel {
    buf: BytesMut,
    /// Read, not yet taken by the stream.
    out: Bytes,
    size: usize,
    next: usize,
    read_done: bool,
    done: bool,
    moved: u64,
}

impl ToTunnel {
    fn new(size: usize) -> Self {
        ToTunnel {
            buf: BytesMut::new(),
            out: Bytes::new(),
            size: size.max(1),
            next: SMALL.min(size.max(1)),
            read_done: false,
            done: false,
            moved: 0,
        }
    }

    fn poll<R>(&mut self, cx: &mut Context<'_>, r: &mut R, t: &mut H2Stream) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while !self.out.is_empty() {
                let n = ready!(t.poll_send(cx, &mut self.out))?;
                self.moved += n as u64;
            }
            // An emptied slice still holds its buffer: let go of it.
            self.out = Bytes::new();
            if self.read_done {
                ready!(t.poll_finish(cx))?;
                self.done = true;
                self.buf = BytesMut::new();
                continue;
            }
            // The rest of the last allocation when it has room, else a new
            // one (the stream may still hold the bytes sent from the old).
            self.buf.reserve(self.next);
            let room = self.buf.capacity() - self.buf.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(n)) => {
                    if n == room {
                        self.next = self.size;
                    }
                    self.out = self.buf.split().freeze();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing in flight: give the buffer back while idle.
                    self.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Tunnel -> app socket: writes each received chunk as it came.
#[derive(Default)]
struct FromTunnel {
    chunk: Bytes,
    read_done: bool,
    need_flush: bool,
    done: bool,
    moved: u64,
}

impl FromTunnel {
    fn poll<W>(&mut self, cx: &mut Context<'_>, t: &mut H2Stream, w: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while !self.chunk.is_empty() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.chunk.advance(n);
                self.moved += n as u64;
                self.need_flush = true;
            }
            // Let go of the codec's buffer the chunk was part of.
            self.chunk = Bytes::new();
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            match t.poll_chunk(cx) {
                Poll::Ready(Ok(None)) => self.read_done = true,
                Poll::Ready(Ok(Some(chunk))) => self.chunk = chunk,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// The two directions of a relay, polled in one task: done when both are
/// (with the bytes each moved), failed as soon as either fails.
pub(crate) fn both_done(
    x: Poll<io::Result<()>>,
    y: Poll<io::Result<()>>,
    moved: (u64, u64),
) -> Poll<io::Result<(u64, u64)>> {
    match (x, y) {
        (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
        (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(moved)),
        _ => Poll::Pending,
    }
}

/// What the relay tests of both copies (this one and the proxy's splice)
/// share: a byte pattern, and a full-duplex exchange through a relay.
#[cfg(test)]
pub(crate) mod test_io {
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Writes `up` from `client` and `down` from `server` at once, each
    /// followed by a shutdown, reads both to EOF, and checks every byte
    /// arrived whole and in order (SHA-256 each way).
    pub async fn full_duplex<C, S>(client: C, server: S, up: &[u8], down: &[u8])
    where
        C: AsyncRead + AsyncWrite,
        S: AsyncRead + AsyncWrite,
    {
        async fn side<T: AsyncRead + AsyncWrite>(io: T, send: &[u8]) -> Vec<u8> {
            let (mut r, mut w) = tokio::io::split(io);
            let mut got = Vec::new();
            let ((), read) = tokio::join!(
                async {
                    w.write_all(send).await.unwrap();
                    w.shutdown().await.unwrap();
                },
                r.read_to_end(&mut got)
            );
            read.unwrap();
            got
        }
        let (got_down, got_up) = tokio::join!(side(client, up), side(server, down));
        assert_eq!(
            Sha256::digest(&got_up),
            Sha256::digest(up),
            "client -> server"
        );
        assert_eq!(
            Sha256::digest(&got_down),
            Sha256::digest(down),
            "server -> client"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::test_io::{full_duplex, pattern};
    use super::*;
    use tokio::io::{AsyncWriteExt, duplex};

    /// client <-> (a | copy | b) <-> server over in-memory pipes that take
    /// a few KiB at a time: every byte both ways, in order, each EOF passed on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn moves_every_byte_both_ways_in_order_and_passes_each_eof_on() {
        let (client, mut a) = duplex(3000);
        let (mut b, server) = duplex(5000);
        // A small buffer: many fill-and-drain rounds per direction.
        let relay = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b, 4096).await });
        let up = pattern(1, 3 << 20);
        let down = pattern(9, (2 << 20) | 77);
        full_duplex(client, server, &up, &down).await;
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(moved, (up.len() as u64, down.len() as u64));
    }

    /// An idle direction holds no buffer; a direction that moved bytes
    /// gives its buffer back once its reader has nothing more.
    #[test]
    fn an_idle_direction_holds_no_buffer() {
        let (mut reader_peer, mut r) = duplex(64);
        let (mut w, _writer_peer) = duplex(1 << 20);
        let mut d = Direction::new(256 * 1024);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(d.poll(&mut cx, &mut r, &mut w).is_pending());
        assert_eq!(d.buf.capacity(), 0, "nothing read yet, nothing held");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(reader_peer.write_all(b"hello")).unwrap();
        assert!(d.poll(&mut cx, &mut r, &mut w).is_pending());
        assert_eq!(d.moved, 5);
        assert_eq!(d.buf.capacity(), 0, "all written, reader idle: released");
        assert_eq!(d.next, SMALL, "5 bytes did not fill the small buffer");
        // A read that fills the small buffer: the next one is full size.
        let (mut reader_peer, mut r) = duplex(64 * 1024);
        rt.block_on(reader_peer.write_all(&[7u8; 40 * 1024]))
            .unwrap();
        assert!(d.poll(&mut cx, &mut r, &mut w).is_pending());
        assert_eq!(d.moved, 5 + 40 * 1024);
        assert_eq!(d.next, 256 * 1024);
    }
}
