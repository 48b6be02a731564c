//! The client side of the enrollment protocol: one request, one answer,
//! over the node proxy's Unix socket, every step under one deadline.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use mesh_core::enroll::{self, EnrollError, Op, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Nobody answers on the socket (proxy down, restarting, or not
    /// serving CNI): the caller decides between fail closed and open.
    #[error("node proxy not reachable at {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    /// It answered, but not within the deadline or not in the protocol.
    #[error("node proxy at {socket}: {source}")]
    Protocol {
        socket: String,
        #[source]
        source: EnrollError,
    },
}

/// A blocking Unix connect fails at once when nobody listens, but waits
/// while a live listener's backlog is full (a stuck proxy): so it runs on
/// a thread of its own, given up after `timeout` (the plugin exits soon
/// after, taking the thread with it).
fn connect(socket: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let path = socket.to_owned();
    std::thread::Builder::new()
        .name("connect".into())
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(path));
        })?;
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect: no room in the listener's backlog within {timeout:?}"),
        ))
    })
}

/// Sends `op` to the proxy at `socket` and returns its answer; the whole
/// exchange (connect, write, read) takes at most `timeout`.
pub fn ask(socket: &Path, op: Op, timeout: Duration) -> Result<Response, AgentError> {
    let shown = socket.display().to_string();
    let req = Request::new(op);
    req.validate().map_err(|source| AgentError::Protocol {
        socket: shown.clone(),
        source,
    })?;
    let deadline = Instant::now() + timeout;
    let mut s = connect(socket, timeout).map_err(|e| AgentError::Unreachable {
        socket: shown.clone(),
        reason: e.to_string(),
    })?;
    let protocol = |source: EnrollError| AgentError::Protocol {
        socket: shown.clone(),
        source,
    };
    let left = |what: &str| -> Result<Duration, AgentError> {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| AgentError::Protocol {
                socket: shown.clone(),
                source: EnrollError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?} ({what})"),
                )),
            })
    };
    s.set_write_timeout(Some(left("write")?))
        .map_err(|e| protocol(e.into()))?;
    enroll::write_frame(&mut s, &req).map_err(protocol)?;
    s.set_read_timeout(Some(left("read")?))
        .map_err(|e| protocol(e.into()))?;
    let body = enroll::read_frame(&mut s).map_err(|e| match e {
        EnrollError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            protocol(EnrollError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )))
        }
        other => protocol(other),
    })?;
    enroll::parse_response(&body).map_err(protocol)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::enroll::Outcome;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_missing_socket_is_unreachable() {
        let d = tempfile::tempdir().unwrap();
        let e = ask(
            &d.path().join("none.sock"),
            Op::Status {},
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, AgentError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("none.sock"), "{e}");
    }

    #[test]
    fn a_silent_proxy_times_out_within_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.sock");
        let _l = UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let e = ask(&path, Op::Status {}, Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(e.to_string().contains("no answer within"), "{e}");
    }

    #[test]
    fn a_proxy_that_stopped_accepting_is_given_up_within_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.sock");
        let _l = UnixListener::bind(&path).unwrap();
        // Fill the backlog (never accepted); the next connect would block.
        let mut held = Vec::new();
        let start = Instant::now();
        let e = loop {
            match connect(&path, Duration::from_millis(200)) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 10_000, "the backlog never filled");
        };
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn an_answer_is_parsed() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let body = enroll::read_frame(&mut c).unwrap();
            assert_eq!(enroll::parse_request(&body).unwrap().op, Op::Status {});
            enroll::write_frame(&mut c, &Response::new(Outcome::Done {})).unwrap();
        });
        let r = ask(&path, Op::Status {}, Duration::from_secs(5)).unwrap();
        assert_eq!(r.outcome, Outcome::Done {});
        t.join().unwrap();
    }
}
