//! The ABI between the sockmesh eBPF programs and user space.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields and a
//! compile-time size assertion, so the kernel and user space can never
//! disagree on a layout. Map and program names are stable API: they are
//! pinned under bpffs and re-opened by a restarted proxy, so change them only
//! with a migration (and bump [`ABI_VERSION`]).
//!
//! Addresses are stored as four `u32` words in **network byte order**, exactly
//! as the kernel hands them to BPF programs (`user_ip4`, `local_ip6`, ...); an
//! IPv4 address lives in word 0 and the other words are zero. Ports are stored
//! in **host byte order**.
#![no_std]
// The `Pod` impls below are the only unsafe code; each has a SAFETY line.
#![cfg_attr(not(feature = "user"), forbid(unsafe_code))]

/// Bumped whenever a map layout, map name or program name changes. Pins live
/// under `<pin root>/abi-v<ABI_VERSION>/`, so a proxy never re-opens maps of
/// another layout.
pub const ABI_VERSION: u32 = 6;

/// In-pod outbound capture listener (127.0.0.1 / [::1]).
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod inbound plaintext capture listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// In-pod HBONE (mTLS) listener.
pub const HBONE_PORT: u16 = 15008;

/// `SO_MARK` carried by every socket the proxy makes inside a pod netns; the
/// connect hooks never redirect a socket that carries it.
pub const PROXY_MARK: u32 = 0x5ec0_0515;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u32 = 6;

/// Map names (at most 15 bytes: the kernel's object-name limit).
pub mod map_names {
    /// netns cookie -> [`super::EnrolledNetns`]: namespaces whose apps are captured.
    pub const ENROLLED: &str = "sm_enrolled";
    /// socket cookie -> [`super::OrigDst`]: written by connect4/6 before the rewrite.
    pub const CONNECT_DST: &str = "sm_connect_dst";
    /// [`super::PortKey`] -> [`super::OrigDst`]: published once established,
    /// read by the proxy on accept.
    pub const ORIG_DST: &str = "sm_orig_dst";
    /// [`super::SockKey`] -> socket: both ends of app<->proxy loopback connections.
    pub const SOCKS: &str = "sm_socks";
    /// socket cookie -> [`super::Flow`]: per-flow accounting.
    pub const FLOWS: &str = "sm_flows";
    /// [`super::IpKey`] -> listening socket: each pod's inbound (15006) listener.
    pub const INBOUND: &str = "sm_inbound";
    /// per-CPU counters indexed by [`super::Stat`].
    pub const STATS: &str = "sm_stats";
    /// index 0: [`super::Config`], read when a flow is established.
    pub const CONFIG: &str = "sm_config";
    /// socket cookie -> [`super::SockAcct`]: which flow counter a socket's
    /// acknowledged bytes feed (count-only flows).
    pub const SOCK_ACCT: &str = "sm_sock_acct";
    /// [`super::HistKey`] -> [`super::TcpHist`] (per-CPU): RTT, retransmit
    /// and connection-duration histograms.
    pub const TCP_HIST: &str = "sm_tcp_hist";
    /// index 0: an all-zero [`super::TcpHist`], the initial value of a new
    /// `sm_tcp_hist` entry (too large for the BPF stack).
    pub const HIST_ZERO: &str = "sm_hist_zero";
    /// [`super::DirectAllowKey`] -> [`super::DirectAllow`]: same-node
    /// destinations the proxy has authorized for a source pod (the kernel
    /// same-node path). Written by the proxy, read by connect4/6.
    pub const DIRECT_ALLOW: &str = "sm_direct_allow";
    /// [`super::DirectKey`] -> [`super::DirectConn`]: connections that took
    /// the kernel same-node path, from the source's connect until its
    /// close; sk_lookup in the destination pod lets only these through.
    pub const DIRECT: &str = "sm_direct";

    pub const ALL: [&str; 13] = [
        ENROLLED,
        CONNECT_DST,
        ORIG_DST,
        SOCKS,
        FLOWS,
        INBOUND,
        STATS,
        CONFIG,
        SOCK_ACCT,
        TCP_HIST,
        HIST_ZERO,
        DIRECT_ALLOW,
        DIRECT,
    ];
}

/// Program names (the Rust function names in the kernel crate).
pub mod program_names {
    pub const CONNECT4: &str = "sm_connect4";
    pub const CONNECT6: &str = "sm_connect6";
    pub const SOCKOPS: &str = "sm_sockops";
    pub const SK_MSG: &str = "sm_sk_msg";
    pub const SK_LOOKUP: &str = "sm_sk_lookup";
}

/// Map capacities.
pub const MAX_FLOWS: u32 = 65_536;
pub const MAX_SOCKS: u32 = 65_536;
pub const MAX_ENROLLED: u32 = 4_096;
pub const MAX_INBOUND: u32 = 8_192;
/// `sm_tcp_hist` entries: tunnel ends (one per source pod, destination pod
/// and side) plus outbound flow destinations (one per source pod and
/// original destination address). Allocated on first use
/// (`BPF_F_NO_PREALLOC`); once full, new keys are not recorded and
/// [`Stat::HistDropped`] counts each sample lost.
pub const MAX_HIST: u32 = 8_192;
/// `sm_direct_allow` entries (source pod x same-node destination address
/// and port); the proxy clears the map when it is full.
pub const MAX_DIRECT_ALLOW: u32 = 16_384;

/// Per-CPU event counters (index into the `sm_stats` array). Readable by
/// `mesh explain`, which is how the data path is debugged (no printk).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// connect4/6 rewrote a destination to the outbound listener.
    ConnectRedirected = 0,
    /// connect4/6 skipped a socket carrying the proxy mark.
    ConnectSkippedMark = 1,
    /// connect4/6 refused a connect because the original destination could
    /// not be recorded (fail closed).
    ConnectRecordFailed = 2,
    /// sockops put a socket into `sm_socks`.
    SockInserted = 3,
    /// sockops could not put a socket into `sm_socks`.
    SockInsertFailed = 4,
    /// sk_msg redirected a message to its peer's ingress queue.
    MsgRedirected = 5,
    /// sk_msg found no peer and let the message take the TCP path.
    MsgPassthrough = 6,
    /// sk_msg saw a message of a flow with no accounting entry.
    MsgUnaccounted = 7,
    /// sk_lookup steered an inbound connection to the pod's 15006 listener.
    LookupSteered = 8,
    /// sk_lookup could not steer to a registered 15006 listener.
    LookupAssignFailed = 9,
    /// sk_lookup dropped an inbound SYN to a captured pod because no proxy
    /// listener was there to take it (proxy down, restarting, draining, or
    /// the pod still waiting for its certificate): fail closed.
    LookupRefused = 10,
    /// connect4/6 recorded a proxy socket delivering a tunnel into its pod
    /// (the destination side of a flow).
    ConnectDelivery = 11,
    /// A histogram sample was lost: `sm_tcp_hist` was full (or could not
    /// allocate) when its key was new.
    HistDropped = 12,
    /// connect4/6 let a connect go straight to a same-node pod (the kernel
    /// same-node path: authorized by the proxy, its listener alive).
    ConnectDirect = 13,
    /// sk_lookup let a kernel same-node connection reach the pod's app.
    LookupDirect = 14,
    /// sk_lookup dropped the SYN of a kernel same-node connection: the
    /// destination's proxy listener is gone (fail closed).
    LookupDirectRefused = 15,
}

pub const STAT_COUNT: u32 = 16;

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::ConnectRedirected,
        Stat::ConnectSkippedMark,
        Stat::ConnectRecordFailed,
        Stat::SockInserted,
        Stat::SockInsertFailed,
        Stat::MsgRedirected,
        Stat::MsgPassthrough,
        Stat::MsgUnaccounted,
        Stat::LookupSteered,
        Stat::LookupAssignFailed,
        Stat::LookupRefused,
        Stat::ConnectDelivery,
        Stat::HistDropped,
        Stat::ConnectDirect,
        Stat::LookupDirect,
        Stat::LookupDirectRefused,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::ConnectRedirected => "connect_redirected",
            Stat::ConnectSkippedMark => "connect_skipped_mark",
            Stat::ConnectRecordFailed => "connect_record_failed",
            Stat::SockInserted => "sock_inserted",
            Stat::SockInsertFailed => "sock_insert_failed",
            Stat::MsgRedirected => "msg_redirected",
            Stat::MsgPassthrough => "msg_passthrough",
            Stat::MsgUnaccounted => "msg_unaccounted",
            Stat::LookupSteered => "lookup_steered",
            Stat::LookupAssignFailed => "lookup_assign_failed",
            Stat::LookupRefused => "lookup_refused",
            Stat::ConnectDelivery => "connect_delivery",
            Stat::HistDropped => "hist_dropped",
            Stat::ConnectDirect => "connect_direct",
            Stat::LookupDirect => "lookup_direct",
            Stat::LookupDirectRefused => "lookup_direct_refused",
        }
    }
}

/// Value of `sm_enrolled`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// Reserved for per-workload settings (fail-open, ...); zero today.
    pub flags: u32,
    pub _pad: u32,
}

/// A destination recorded before the connect rewrite.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Network byte order words; IPv4 in word 0.
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    /// [`ORIG_DELIVERY`] for a proxy socket delivering into its own pod.
    pub flags: u32,
    /// Cookie of the socket whose `sm_flows` entry this is.
    pub cookie: u64,
}

/// [`OrigDst::flags`]: the socket is the proxy's, connecting to the pod it
/// sits in (the destination side of a mesh connection).
pub const ORIG_DELIVERY: u32 = 1;
/// [`OrigDst::flags`]: connect4/6 left the connect alone because the proxy
/// authorized this destination for this pod (`sm_direct_allow`): the
/// kernel same-node path. Never together with [`ORIG_DELIVERY`].
pub const ORIG_DIRECT: u32 = 2;

/// Key of `sm_orig_dst`: a local port inside a netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub netns: u64,
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    /// [`PORT_APP`] or [`PORT_DELIVERY`]: the two kinds live in one map
    /// but never collide (a local port can serve two 4-tuples).
    pub kind: u32,
}

/// [`PortKey::kind`]: an app socket's port (connected to 15001); the proxy
/// looks it up on accept.
pub const PORT_APP: u32 = 0;
/// [`PortKey::kind`]: the port of a proxy socket delivering into its pod;
/// the app's accepted socket finds its flow by it.
pub const PORT_DELIVERY: u32 = 1;

/// Value of `sm_sock_acct`: a socket of a count-only flow and the flow
/// counter its acknowledged bytes (`tcp_sock.bytes_acked`) feed. Each
/// counter has exactly one such socket: the sender of those bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAcct {
    /// The flow's key in `sm_flows`.
    pub flow: u64,
    /// `bytes_acked` when the socket was established: 1 on the active
    /// side (its SYN), 0 on the passive side.
    pub base: u32,
    /// [`ACCT_SENT`] or [`ACCT_RECEIVED`].
    pub role: u32,
    /// A second flow fed the same way (same role), or 0: on the kernel
    /// same-node path one connection is both the source's flow and the
    /// destination's ([`FLOW_DIRECT`]). When the socket of role
    /// [`ACCT_SENT`] closes, the mirror's `peer_state` becomes closed.
    pub mirror: u64,
}

/// [`SockAcct::role`]: feeds [`Flow::bytes_sent`] and the flow's state.
pub const ACCT_SENT: u32 = 1;
/// [`SockAcct::role`]: feeds [`Flow::bytes_received`] and
/// [`Flow::peer_state`].
pub const ACCT_RECEIVED: u32 = 2;

/// Key of `sm_socks`: one end of a loopback connection, as seen from that end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Host byte order.
    pub local_port: u32,
    /// Host byte order.
    pub remote_port: u32,
    pub family: u32,
    pub _pad: u32,
}

impl SockKey {
    /// The key under which the other end of this connection is stored.
    /// Getting this orientation wrong redirects bytes back to the sender.
    pub const fn peer(&self) -> SockKey {
        SockKey {
            netns: self.netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
            _pad: 0,
        }
    }
}

/// Key of `sm_inbound`: a pod address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub ip: [u32; 4],
    pub family: u32,
}

/// Value at index 0 of `sm_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// [`FLOW_REDIRECT`] and friends: what new flows get.
    pub flow_flags: u32,
    /// [`CONFIG_NO_HISTOGRAMS`], [`CONFIG_NO_ACCOUNTING`]. Zero (a fresh
    /// map) means everything on.
    pub flags: u32,
    /// The `sm_direct_allow` entries of this generation are valid; 0: none
    /// is. The proxy moves it on every change of what it authorizes
    /// (registry, policy, enrollment) and when it starts or stops.
    pub direct_generation: u64,
}

/// [`Config::flags`]: record no histogram samples, and enable no per-ACK
/// callback on tunnels established from then on (the cost switch).
pub const CONFIG_NO_HISTOGRAMS: u32 = 1;
/// [`Config::flags`]: count no bytes on flows established from then on
/// (no `sm_sock_acct` entry, no per-ACK callback): the flows are still
/// recorded (original destinations, states), with zero bytes. A benchmark
/// switch, to measure what the accounting costs; a proxy never sets it.
pub const CONFIG_NO_ACCOUNTING: u32 = 2;

/// Key of `sm_direct_allow`: a source pod (its netns) and a destination
/// exactly as its apps give it to connect().
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirectAllowKey {
    pub netns: u64,
    pub ip: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Value of `sm_direct_allow`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectAllow {
    /// Valid while equal to [`Config::direct_generation`].
    pub generation: u64,
}

/// Key of `sm_direct`: a kernel same-node connection's 4-tuple, source
/// first (pod addresses are unique on a node: no netns needed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirectKey {
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    /// Host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    pub family: u32,
}

/// Value of `sm_direct`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectConn {
    /// The source app socket's cookie: its flow's key in `sm_flows`.
    pub flow: u64,
}

/// Flow flag: sk_msg redirects the flow's bytes straight to the peer's
/// ingress queue (both ends are in `sm_socks`) and counts them. Without it
/// (the default) no socket of the flow is in `sm_socks`: the bytes take
/// loopback TCP with its flow control, untouched, and sockops counts them
/// from each sender's `bytes_acked` (see [`SockAcct`]).
pub const FLOW_REDIRECT: u32 = 1;
/// Flow flag: the destination side of a mesh connection (the proxy's
/// delivery into its pod), keyed by the proxy socket's cookie.
pub const FLOW_DELIVERY: u32 = 2;
/// Flow flag: a connection on the kernel same-node path (no proxy socket):
/// the source's flow (keyed by the app's socket) and the destination's
/// (with [`FLOW_DELIVERY`], keyed by the destination app's accepted socket,
/// `src_ip`/`src_port` the source pod's) are fed by the same two sockets.
pub const FLOW_DIRECT: u32 = 4;

/// [`Flow::peer_state`]: no peer socket is counted (redirected flows).
pub const PEER_NONE: u32 = 0;
/// [`Flow::peer_state`]: the peer socket is counted and open.
pub const PEER_OPEN: u32 = 1;
/// [`Flow::peer_state`]: the peer socket closed: its counter is final.
pub const PEER_CLOSED: u32 = 2;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;

    /// States in which this socket has queued its FIN (so `bytes_acked`
    /// may count it, once acknowledged), or that follow one.
    pub const fn fin_queued(state: u32) -> bool {
        matches!(
            state,
            FIN_WAIT1 | FIN_WAIT2 | CLOSING | TIME_WAIT | LAST_ACK | CLOSE
        )
    }
}

/// Value of `sm_flows`: one app connection that the mesh captured.
///
/// Written only in the kernel. Each field has exactly one writer, which runs
/// serialized per socket, so plain (non-atomic) read-modify-write is exact.
/// Count-only flows (the default): `bytes_sent` and `state` are written by
/// sockops on the socket that sends those bytes (the app's for outbound,
/// the proxy's for a delivery), `bytes_received` and `peer_state` by
/// sockops on the other end, each from its own `bytes_acked` (SYN and FIN
/// excluded), at every RTT sample and state change: nothing touches the
/// data. Redirected flows: sk_msg on each socket counts what it sends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub netns: u64,
    /// `CLOCK_MONOTONIC` nanoseconds (bpf_ktime_get_ns).
    pub start_ns: u64,
    /// Zero while open.
    pub end_ns: u64,
    /// Bytes the app wrote.
    pub bytes_sent: u64,
    /// Bytes delivered to the app.
    pub bytes_received: u64,
    /// The app socket's own addresses (loopback after the rewrite).
    pub src_ip: [u32; 4],
    pub dst_ip: [u32; 4],
    /// Where the app asked to connect.
    pub orig_ip: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub orig_port: u16,
    pub family: u16,
    /// Smoothed RTT in microseconds (0 when the TCP path saw no samples,
    /// which is the normal case for redirected flows).
    pub srtt_us: u32,
    /// Kernel TCP state ([`tcp_state`]).
    pub state: u32,
    pub protocol: u32,
    /// [`FLOW_REDIRECT`] (fixed when the flow is established: switching a
    /// live flow between the two paths could reorder its bytes) and
    /// [`FLOW_DELIVERY`].
    pub flags: u32,
    /// [`PEER_NONE`], [`PEER_OPEN`] or [`PEER_CLOSED`]: the flow is over
    /// once `state` is CLOSE and no counted peer is still open.
    pub peer_state: u32,
    pub _pad: u32,
}

/// Number of buckets of a [`TcpHist`].
pub const HIST_BUCKETS: usize = 32;

/// [`HistKey::kind`]: the client end of an HBONE tunnel (the source proxy's
/// socket in the source pod's netns, dialling the destination pod's 15008).
/// `local_ip` is the source pod, `remote_ip` the destination pod. RTT (in
/// microseconds), retransmissions and RTOs.
pub const HIST_TUNNEL_OUT: u16 = 1;
/// [`HistKey::kind`]: the server end of an HBONE tunnel (accepted on 15008
/// in the destination pod's netns). `local_ip` is the destination pod,
/// `remote_ip` the source pod. RTT, retransmissions and RTOs.
pub const HIST_TUNNEL_IN: u16 = 2;
/// [`HistKey::kind`]: outbound app connections of the pod with netns
/// `netns` to original destination `remote_ip` (a pod, a Service VIP or an
/// address outside the mesh), their duration in milliseconds at close.
pub const HIST_FLOW: u16 = 3;

/// Key of `sm_tcp_hist`. A tunnel is pooled per (source pod, destination
/// pod), so the tunnel kinds carry exactly one workload pair: the key is
/// the pair, not the socket, and every tunnel of a pair (and every port)
/// lands in one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HistKey {
    /// Cookie of the netns the socket lives in (the pod's).
    pub netns: u64,
    /// Network-order words (zero for [`HIST_FLOW`]).
    pub local_ip: [u32; 4],
    /// Network-order words.
    pub remote_ip: [u32; 4],
    pub family: u16,
    /// [`HIST_TUNNEL_OUT`], [`HIST_TUNNEL_IN`] or [`HIST_FLOW`].
    pub kind: u16,
    pub _pad: u32,
}

/// Value of `sm_tcp_hist` (one per CPU; readers sum them). Bucket `i`
/// counts samples `v` with `floor(log2(v)) == i` (bucket 0 also takes 0
/// and 1; the last bucket everything from `2^31` up): see [`hist_bucket`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpHist {
    pub buckets: [u64; HIST_BUCKETS],
    /// Samples recorded (the sum of `buckets`).
    pub count: u64,
    /// Sum of the samples (microseconds for RTT, milliseconds for
    /// durations).
    pub sum: u64,
    /// Segments retransmitted (tunnel kinds; as `tcp_info.total_retrans`).
    pub retransmits: u64,
    /// Retransmission timeouts that fired (tunnel kinds).
    pub rtos: u64,
}

impl Default for TcpHist {
    fn default() -> Self {
        TcpHist {
            buckets: [0; HIST_BUCKETS],
            count: 0,
            sum: 0,
            retransmits: 0,
            rtos: 0,
        }
    }
}

/// The bucket of a sample: `floor(log2(v))`, 0 for 0 and 1, at most
/// `HIST_BUCKETS - 1`. Branches only (no loop, no count-leading-zeros
/// instruction in BPF), so the kernel and user space run the same code.
#[inline(always)]
pub const fn hist_bucket(v: u64) -> usize {
    let mut v = v;
    let mut r = 0usize;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    if r >= HIST_BUCKETS {
        HIST_BUCKETS - 1
    } else {
        r
    }
}

/// The largest sample bucket `i` holds, as a Prometheus `le` bound:
/// `2^(i+1) - 1` (samples are integers). `None` for the last bucket,
/// which is unbounded (`+Inf`).
pub const fn hist_bucket_max(i: usize) -> Option<u64> {
    if i + 1 >= HIST_BUCKETS {
        None
    } else {
        Some((1u64 << (i + 1)) - 1)
    }
}

const _: () = {
    assert!(core::mem::size_of::<HistKey>() == 48);
    assert!(core::mem::size_of::<TcpHist>() == (HIST_BUCKETS + 4) * 8);
    assert!(core::mem::size_of::<EnrolledNetns>() == 8);
    assert!(core::mem::size_of::<OrigDst>() == 32);
    assert!(core::mem::size_of::<PortKey>() == 16);
    assert!(core::mem::size_of::<SockKey>() == 56);
    assert!(core::mem::size_of::<IpKey>() == 20);
    assert!(core::mem::size_of::<Flow>() == 120);
    assert!(core::mem::size_of::<Config>() == 16);
    assert!(core::mem::size_of::<SockAcct>() == 24);
    assert!(core::mem::size_of::<DirectAllowKey>() == 32);
    assert!(core::mem::size_of::<DirectAllow>() == 8);
    assert!(core::mem::size_of::<DirectKey>() == 40);
    assert!(core::mem::size_of::<DirectConn>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], Copy, built only from integers, and has
    // no implicit padding (size asserts above), so any bit pattern is valid.
    unsafe impl aya::Pod for EnrolledNetns {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IpKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockAcct {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HistKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TcpHist {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DirectAllowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DirectAllow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DirectKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DirectConn {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn flow_layout_has_no_implicit_padding() {
        // Sum of field sizes equals the struct size: no hidden holes that
        // kernel and user space could fill differently.
        let fields = 5 * 8 + 3 * 16 + 4 * 2 + 6 * 4;
        assert_eq!(size_of::<Flow>(), fields);
        assert_eq!(offset_of!(Flow, src_ip), 40);
        assert_eq!(offset_of!(Flow, src_port), 88);
        assert_eq!(offset_of!(Flow, srtt_us), 96);
        assert_eq!(align_of::<Flow>(), 8);
    }

    #[test]
    fn keys_have_no_implicit_padding() {
        assert_eq!(size_of::<SockKey>(), 8 + 16 + 16 + 4 * 4);
        assert_eq!(offset_of!(SockKey, local_port), 40);
        assert_eq!(size_of::<PortKey>(), 8 + 2 + 2 + 4);
        assert_eq!(size_of::<OrigDst>(), 16 + 2 + 2 + 4 + 8);
        assert_eq!(offset_of!(OrigDst, cookie), 24);
        assert_eq!(size_of::<IpKey>(), 16 + 4);
    }

    #[test]
    fn peer_key_swaps_ends_and_is_an_involution() {
        let k = SockKey {
            netns: 7,
            local_ip: [1, 0, 0, 0],
            remote_ip: [2, 0, 0, 0],
            local_port: 40000,
            remote_port: OUTBOUND_PORT as u32,
            family: AF_INET as u32,
            _pad: 0,
        };
        let p = k.peer();
        assert_eq!(p.local_port, OUTBOUND_PORT as u32);
        assert_eq!(p.remote_port, 40000);
        assert_eq!(p.local_ip, [2, 0, 0, 0]);
        assert_eq!(p.peer(), k);
    }

    #[test]
    fn names_fit_the_kernel_object_name_limit() {
        for n in map_names::ALL {
            assert!(n.len() <= 15, "{n} is longer than 15 bytes");
        }
        for n in [
            program_names::CONNECT4,
            program_names::CONNECT6,
            program_names::SOCKOPS,
            program_names::SK_MSG,
            program_names::SK_LOOKUP,
        ] {
            assert!(n.len() <= 15, "{n} is longer than 15 bytes");
        }
    }

    #[test]
    fn hist_buckets_are_floor_log2_clamped() {
        assert_eq!(hist_bucket(0), 0);
        assert_eq!(hist_bucket(1), 0);
        assert_eq!(hist_bucket(2), 1);
        assert_eq!(hist_bucket(3), 1);
        assert_eq!(hist_bucket(4), 2);
        assert_eq!(hist_bucket(1023), 9);
        assert_eq!(hist_bucket(1024), 10);
        assert_eq!(hist_bucket((1 << 31) - 1), 30);
        assert_eq!(hist_bucket(1 << 31), 31);
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
        for i in 0..63 {
            let v = 1u64 << i;
            assert_eq!(hist_bucket(v), i.min(HIST_BUCKETS - 1), "2^{i}");
            if i > 1 {
                assert_eq!(hist_bucket(v - 1), (i - 1).min(HIST_BUCKETS - 1), "2^{i}-1");
            }
        }
    }

    #[test]
    fn every_sample_is_at_most_its_buckets_bound_and_above_the_previous_one() {
        let samples = (0..70u32).flat_map(|i| {
            let v = 1u64.checked_shl(i).unwrap_or(u64::MAX);
            [
                v.saturating_sub(1),
                v,
                v.saturating_add(1),
                v.saturating_mul(3) / 2,
            ]
        });
        for v in samples {
            let b = hist_bucket(v);
            if let Some(max) = hist_bucket_max(b) {
                assert!(v <= max, "{v} in bucket {b} above {max}");
            } else {
                assert_eq!(b, HIST_BUCKETS - 1);
            }
            if b > 0 {
                let below = hist_bucket_max(b - 1).unwrap();
                assert!(v > below, "{v} in bucket {b} not above {below}");
            }
        }
    }

    #[test]
    fn hist_layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<HistKey>(), 8 + 16 + 16 + 2 + 2 + 4);
        assert_eq!(offset_of!(HistKey, family), 40);
        assert_eq!(offset_of!(TcpHist, count), HIST_BUCKETS * 8);
    }

    #[test]
    fn stats_are_numbered_densely() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{}", s.name());
        }
    }
}
