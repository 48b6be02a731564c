//! Copying between two plaintext TCP sockets inside the kernel:
//! `splice(2)` from one socket into a pipe, then from the pipe into the
//! other, so the bytes never cross into the proxy's memory (the pipe holds
//! references to the socket buffers' pages). Used where both legs of a
//! connection carry plaintext: passthrough (outbound to a non-mesh
//! destination), inbound plaintext (PERMISSIVE), and the same-node path.
//!
//! Both directions run in the caller's task (no cross-thread wakeup between
//! them), each with its own pipe, made when its first byte is ready (an
//! idle connection holds no pipe). TCP's flow control is untouched: a
//! direction reads only when its pipe is empty, so a slow reader on one
//! side stops the reads on the other, as with a userspace buffer. A read
//! of 0 (FIN) is passed on as a half-close once the pipe is drained.

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};
use nix::unistd::pipe2;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// One direction's pipe.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // A larger pipe moves more per call (the default is 64 KiB). The
        // kernel may refuse (pipe-max-size, per-user pipe memory): the
        // default still works, only with more calls.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(size as libc::c_int));
        Ok(Pipe { read, write })
    }
}

/// `splice(2)` of at most `len` bytes, non-blocking on the pipe side (the
/// socket is non-blocking already).
fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    Ok(nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )?)
}

/// One direction: `from` -> pipe -> `to`.
struct Half {
    pipe: Option<Pipe>,
    pipe_size: usize,
    /// Bytes in the pipe, not yet written to `to`.
    pending: usize,
    /// `from` sent its FIN.
    eof: bool,
    /// `to` was half-closed after the last byte.
    done: bool,
    /// Bytes written to `to`.
    moved: u64,
}

impl Half {
    fn new(pipe_size: usize) -> Self {
        Half {
            pipe: None,
            pipe_size,
            pending: 0,
            eof: false,
            done: false,
            moved: 0,
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.pending > 0 {
                let Some(pipe) = &self.pipe else {
                    return Poll::Ready(Err(io::Error::other(
                        "splice: bytes pending without a pipe",
                    )));
                };
                ready!(to.poll_write_ready(cx))?;
                match to.try_io(Interest::WRITABLE, || splice(&pipe.read, to, self.pending)) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.pending -= n;
                        self.moved += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            } else if self.eof {
                // Everything read was written: pass the FIN on.
                self.done = true;
                match nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write)
                {
                    // The peer may be gone already; its reads ended anyway.
                    Ok(()) | Err(nix::errno::Errno::ENOTCONN) => {}
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            } else {
                ready!(from.poll_read_ready(cx))?;
                if self.pipe.is_none() {
                    self.pipe = Some(Pipe::new(self.pipe_size)?);
                }
                let Some(pipe) = &self.pipe else { continue };
                match from.try_io(Interest::READABLE, || {
                    splice(from, &pipe.write, self.pipe_size)
                }) {
                    Ok(0) => self.eof = true,
                    Ok(n) => self.pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
    }
}

/// Copies both ways between `a` and `b` until both directions ended (each
/// FIN passed on), in the kernel. Returns `(a -> b, b -> a)` bytes; an
/// error on either direction ends both (the caller drops the sockets).
/// With `idle`, a relay that moved no byte either way for that long ends
/// with `TimedOut` (the tunnels' idle timeout, for the same-node path).
pub(crate) async fn splice_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    pipe_size: usize,
    idle: Option<Duration>,
) -> io::Result<(u64, u64)> {
    let (mut ab, mut ba) = (Half::new(pipe_size), Half::new(pipe_size));
    // Checked when the deadline passes (not re-armed on every byte): the
    // bytes moved then against those at the last check.
    let mut idle = idle.map(|d| (d, Box::pin(tokio::time::sleep(d)), (0, 0)));
    poll_fn(|cx| {
        let x = ab.poll(cx, a, b);
        let y = ba.poll(cx, b, a);
        let moved = (ab.moved, ba.moved);
        let done = crate::hbone::copy::both_done(x, y, moved);
        if done.is_ready() {
            return done;
        }
        if let Some((after, sleep, seen)) = &mut idle {
            while sleep.as_mut().poll(cx).is_ready() {
                if moved == *seen {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no byte either way for {after:?}"),
                    )));
                }
                *seen = moved;
                sleep.as_mut().reset(tokio::time::Instant::now() + *after);
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hbone::copy::test_io::{full_duplex, pattern};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    /// client <-> (a | splice | b) <-> server, full duplex, every byte
    /// checked both ways, half-close passed on each way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn moves_every_byte_both_ways_and_passes_each_half_close_on() {
        let (client, a) = pair().await;
        let (b, server) = pair().await;
        // Small pipes: many rounds of read-then-drain per direction.
        let relay = tokio::spawn(async move { splice_bidirectional(&a, &b, 4096, None).await });
        let up = pattern(1, 8 << 20);
        let down = pattern(7, (5 << 20) | 123);
        full_duplex(client, server, &up, &down).await;
        let (ab, ba) = relay.await.unwrap().unwrap();
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    /// One side answers after the other half-closed (a request, FIN, then
    /// the response): the relay keeps the open direction going.
    #[tokio::test]
    async fn an_answer_after_the_request_half_close_still_arrives() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay = tokio::spawn(async move { splice_bidirectional(&a, &b, 1 << 16, None).await });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut req = Vec::new();
        server.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        server.write_all(b"answer").await.unwrap();
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        assert_eq!(relay.await.unwrap().unwrap(), (7, 6));
    }

    /// A reset on one side ends the relay with an error (not a hang).
    #[tokio::test]
    async fn a_reset_ends_the_relay_with_an_error() {
        let (client, a) = pair().await;
        let (b, _server) = pair().await;
        let relay = tokio::spawn(async move { splice_bidirectional(&a, &b, 1 << 16, None).await });
        client.set_zero_linger().unwrap();
        drop(client);
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), relay)
            .await
            .expect("the relay ended")
            .unwrap();
        assert!(r.is_err(), "{r:?}");
    }

    /// A relay with an idle bound ends with TimedOut once no byte moved
    /// for that long, and not while bytes keep moving.
    #[tokio::test]
    async fn an_idle_relay_ends_after_its_idle_bound() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let idle = std::time::Duration::from_millis(300);
        let relay =
            tokio::spawn(async move { splice_bidirectional(&a, &b, 1 << 16, Some(idle)).await });
        // Bytes every 100 ms for 900 ms: three idle bounds pass, never idle.
        let mut got = [0u8; 1];
        for _ in 0..9 {
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(!relay.is_finished(), "ended while bytes were moving");
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), relay)
            .await
            .expect("the idle relay ended")
            .unwrap();
        let e = r.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }
}
