//! Deterministic test traffic: both ends of a connection send a known number
//! of bytes, half-close, read until EOF, and report SHA-256 digests of what
//! they sent and received.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const CHUNK: usize = 256 * 1024;

/// When set, a spurious EAGAIN on a blocking read is an error (an app that
/// does not expect it would fail), not retried.
pub static STRICT_EAGAIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What one end moved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub sent: u64,
    pub sent_sha256: String,
    pub received: u64,
    pub received_sha256: String,
}

/// Chunk `i` of the stream seeded `seed`: a base block with the chunk
/// index and seed mixed into every 8 bytes, so a lost, repeated or
/// reordered chunk changes the digest.
fn chunk(seed: u64, i: u64, out: &mut [u8]) {
    let mut x = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    for word in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        word.copy_from_slice(&b[..word.len()]);
    }
}

/// The first `n` bytes (at most one chunk) of stream `seed`: what a
/// capture must never show in clear.
pub fn prefix(seed: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n.min(CHUNK)];
    chunk(seed, 0, &mut b);
    b
}

/// Sends `n` bytes of stream `seed`, returning its digest.
pub fn send(mut w: impl Write, seed: u64, n: u64) -> io::Result<String> {
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    let mut left = n;
    let mut i = 0;
    while left > 0 {
        let len = left.min(CHUNK as u64) as usize;
        chunk(seed, i, &mut buf[..len]);
        w.write_all(&buf[..len])?;
        h.update(&buf[..len]);
        left -= len as u64;
        i += 1;
    }
    w.flush()?;
    Ok(hex(&h.finalize()))
}

/// Reads until EOF, returning the count and digest.
pub fn receive(mut r: impl Read) -> io::Result<(u64, String)> {
    let mut buf = vec![0u8; CHUNK];
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut eagain = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A blocking socket in the socket map can see one EAGAIN when
            // the FIN arrives while it waits (tcp_bpf_recvmsg, see
            // ARCHITECTURE.md "Known limits"); retry as a non-blocking app
            // would. A real read timeout also surfaces as WouldBlock, so the
            // retries are bounded.
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && eagain < 3
                    && !STRICT_EAGAIN.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                eagain += 1
            }
            Err(e) => return Err(e),
        }
    }
    Ok((n, hex(&h.finalize())))
}

/// The digest `send(seed, n)` produces, without a socket.
pub fn expected_sha256(seed: u64, n: u64) -> String {
    send(io::sink(), seed, n).unwrap_or_default()
}

/// Full duplex on one connection: send `n` bytes while reading the peer's
/// bytes until EOF. Without `hold` the write side half-closes as soon as it
/// has sent; with `hold` it half-closes only after EOF from the peer and
/// after `hold` returns (the flow stays open meanwhile).
pub fn duplex(
    stream: &TcpStream,
    seed: u64,
    n: u64,
    hold: Option<&dyn Fn()>,
) -> io::Result<Transfer> {
    let writer = stream.try_clone()?;
    let fin_now = hold.is_none();
    let (sent_sha256, received, received_sha256) = std::thread::scope(|s| {
        let w = s.spawn(move || -> io::Result<String> {
            let sha = send(&writer, seed, n)?;
            if fin_now {
                writer.shutdown(Shutdown::Write)?;
            }
            Ok(sha)
        });
        let r = receive(stream);
        let sha = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        let (received, received_sha) = r?;
        io::Result::Ok((sha?, received, received_sha))
    })?;
    if let Some(hold) = hold {
        hold();
        stream.shutdown(Shutdown::Write)?;
    }
    Ok(Transfer {
        sent: n,
        sent_sha256,
        received,
        received_sha256,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_by_seed_and_chunk_order_matters() {
        assert_ne!(expected_sha256(1, 1 << 20), expected_sha256(2, 1 << 20));
        let mut a = vec![0u8; 64];
        let mut b = vec![0u8; 64];
        chunk(1, 0, &mut a);
        chunk(1, 1, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn receive_counts_what_send_wrote() {
        let mut buf = Vec::new();
        let sha = send(&mut buf, 7, 1_000_003).unwrap();
        let (n, got) = receive(&buf[..]).unwrap();
        assert_eq!(n, 1_000_003);
        assert_eq!(got, sha);
    }
}
