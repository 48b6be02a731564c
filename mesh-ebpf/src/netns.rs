//! Network namespaces: run code inside one, and learn a namespace's cookie
//! (the id the eBPF programs see through `bpf_get_netns_cookie`).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// An error naming the namespace that failed.
#[derive(Debug, thiserror::Error)]
#[error("netns {path}: {action}: {source}")]
pub struct NetnsError {
    pub path: PathBuf,
    pub action: &'static str,
    #[source]
    pub source: io::Error,
}

/// Runs `f` on a fresh thread that has joined the network namespace at
/// `netns` (e.g. `/run/netns/NAME` or `/proc/PID/ns/net`). Sockets `f`
/// creates live in that namespace; the calling thread is untouched.
pub fn run_in<T, F>(netns: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let err = |action, source| NetnsError {
        path: netns.to_owned(),
        action,
        source,
    };
    let file = File::open(netns).map_err(|e| err("open", e))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| err("setns", io::Error::from(e)))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The cookie of the network namespace a socket lives in (`SO_NETNS_COOKIE`,
/// Linux 5.14+).
pub fn cookie_of_socket(sock: &impl AsRawFd) -> io::Result<u64> {
    u64_sockopt(sock, libc::SO_NETNS_COOKIE)
}

/// The socket's own cookie (`SO_COOKIE`): the key of its flow in the
/// kernel's flow map.
pub fn socket_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    u64_sockopt(sock, libc::SO_COOKIE)
}

fn u64_sockopt(sock: &impl AsRawFd, opt: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given; the
    // kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The cookie of the network namespace at `netns`.
pub fn cookie(netns: &Path) -> Result<u64, NetnsError> {
    let path = netns.to_owned();
    run_in(netns, current_cookie)?.map_err(|source| NetnsError {
        path,
        action: "read SO_NETNS_COOKIE",
        source,
    })
}

/// The cookie of the calling thread's current network namespace.
pub fn current_cookie() -> io::Result<u64> {
    // An unbound socket: works even where loopback is down.
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    cookie_of_socket(&sock)
}

/// Makes sockets inside one pod's network namespace from any thread: enters
/// the pod netns, creates the socket, returns to the thread's own netns —
/// two `setns` calls, no thread hop, so it is cheap enough per connection.
/// A socket keeps the netns it was created in for its whole life.
#[derive(Debug)]
pub struct PodSockets {
    path: PathBuf,
    pod: std::os::fd::OwnedFd,
}

impl PodSockets {
    pub fn open(netns: &Path) -> Result<Self, NetnsError> {
        let pod = File::open(netns)
            .map_err(|source| NetnsError {
                path: netns.to_owned(),
                action: "open",
                source,
            })?
            .into();
        Ok(PodSockets {
            path: netns.to_owned(),
            pod,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside the pod netns, then puts the
    /// thread back. If the thread cannot be put back the process aborts:
    /// carrying on in the wrong namespace would send traffic from the wrong
    /// place.
    pub fn within<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = File::open("/proc/thread-self/ns/net")?;
        setns(self.pod.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("setns {}: {e}", self.path.display())))?;
        let out = f();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!(
                "fatal: cannot return from netns {}: {e}",
                self.path.display()
            );
            std::process::abort();
        }
        out
    }

    /// An unconnected, non-blocking TCP socket in the pod netns, carrying
    /// `mark` (SO_MARK) when given.
    pub fn tcp_socket(&self, ipv6: bool, mark: Option<u32>) -> io::Result<std::net::TcpStream> {
        use nix::sys::socket::{setsockopt, sockopt};
        let family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let fd = self.within(|| {
            Ok(socket(
                family,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )?)
        })?;
        if let Some(mark) = mark {
            setsockopt(&fd, sockopt::Mark, &mark)?;
        }
        Ok(std::net::TcpStream::from(fd))
    }

    /// A non-blocking listener bound to `addr` in the pod netns.
    pub fn listen(&self, addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
        let l = self.within(|| std::net::TcpListener::bind(addr))?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    /// The cookie of the pod's netns.
    pub fn cookie(&self) -> io::Result<u64> {
        self.within(current_cookie)
    }
}
