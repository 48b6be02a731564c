// Every `unsafe` here is one of: a read of a field of the context the kernel
// handed us (valid for the program's lifetime, checked by the verifier), a
// helper call with that context, or a write through a map value pointer the
// kernel just returned for this key.
use core::ffi::c_void;
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::bindings::{
    BPF_ANY, BPF_F_INGRESS, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG,
    BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
    BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, sk_action,
};
use aya_ebpf::helpers::{
    bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_lookup_elem,
    bpf_sk_release,
};
use aya_ebpf::macros::{cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash};
use aya_ebpf::programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext};
use mesh_ebpf_common::{
    ACCT_RECEIVED, ACCT_SENT, AF_INET, AF_INET6, CONFIG_NO_ACCOUNTING, CONFIG_NO_HISTOGRAMS,
    Config, DirectAllow, DirectAllowKey, DirectConn, DirectKey, EnrolledNetns, FLOW_DELIVERY,
    FLOW_DIRECT, FLOW_REDIRECT, Flow, HBONE_PORT, HIST_FLOW, HIST_TUNNEL_IN, HIST_TUNNEL_OUT,
    HistKey, INBOUND_PLAINTEXT_PORT, IPPROTO_TCP, IpKey, MAX_DIRECT_ALLOW, MAX_ENROLLED, MAX_FLOWS,
    MAX_HIST, MAX_INBOUND, MAX_SOCKS, ORIG_DELIVERY, ORIG_DIRECT, OUTBOUND_PORT, OrigDst,
    PEER_CLOSED, PEER_OPEN, PORT_APP, PORT_DELIVERY, PROXY_MARK, PortKey, STAT_COUNT, SockAcct,
    SockKey, Stat, TcpHist, hist_bucket, tcp_state,
};

#[map(name = "sm_enrolled")]
static ENROLLED: HashMap<u64, EnrolledNetns> = HashMap::with_max_entries(MAX_ENROLLED, 0);

#[map(name = "sm_connect_dst")]
static CONNECT_DST: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

#[map(name = "sm_orig_dst")]
static ORIG_DST: LruHashMap<PortKey, OrigDst> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

#[map(name = "sm_socks")]
static SOCKS: SockHash<SockKey> = SockHash::with_max_entries(MAX_SOCKS, 0);

#[map(name = "sm_flows")]
static FLOWS: LruHashMap<u64, Flow> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map(name = "sm_inbound")]
static INBOUND: SockHash<IpKey> = SockHash::with_max_entries(MAX_INBOUND, 0);

#[map(name = "sm_stats")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[map(name = "sm_config")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "sm_sock_acct")]
static SOCK_ACCT: LruHashMap<u64, SockAcct> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

#[map(name = "sm_tcp_hist")]
static TCP_HIST: PerCpuHashMap<HistKey, TcpHist> =
    PerCpuHashMap::with_max_entries(MAX_HIST, BPF_F_NO_PREALLOC);

#[map(name = "sm_hist_zero")]
static HIST_ZERO: Array<TcpHist> = Array::with_max_entries(1, 0);

#[map(name = "sm_direct_allow")]
static DIRECT_ALLOW: HashMap<DirectAllowKey, DirectAllow> =
    HashMap::with_max_entries(MAX_DIRECT_ALLOW, 0);

#[map(name = "sm_direct")]
static DIRECT: LruHashMap<DirectKey, DirectConn> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

const SOCK_STREAM: u32 = 1;
const ENOENT: i32 = 2;
const EEXIST: i32 = 17;

/// The proxy's in-pod ports: never a destination the proxy dials for a pod.
#[inline(always)]
fn is_proxy_port(port: u32) -> bool {
    port == OUTBOUND_PORT as u32
        || port == INBOUND_PLAINTEXT_PORT as u32
        || port == HBONE_PORT as u32
}

#[inline(always)]
fn bump(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot of this CPU; BPF programs are not preempted
        // on a CPU while they run.
        unsafe { *p += 1 };
    }
}

/// First octet of a network-order IPv4 word loaded little-endian.
#[inline(always)]
fn is_loopback4(ip: u32) -> bool {
    ip & 0xff == 127
}

#[inline(always)]
fn is_loopback6(ip: &[u32; 4]) -> bool {
    let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffff_u32.to_be();
    (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 1_u32.to_be())
        || (v4_mapped && is_loopback4(ip[3]))
}

// ---------------------------------------------------------------------------
// cgroup/connect4, cgroup/connect6
// ---------------------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn sm_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn sm_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, AF_INET6)
}

/// Returns 1 to let the connect proceed, 0 to refuse it (EPERM).
#[inline(always)]
fn connect(ctx: &SockAddrContext, family: u16) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: context fields, see the file header.
    let (ty, proto) = unsafe { (read_volatile(&(*sa).type_), read_volatile(&(*sa).protocol)) };
    if ty != SOCK_STREAM || (proto != IPPROTO_TCP && proto != 0) {
        return 1;
    }
    // SAFETY: helper on our context.
    let netns = unsafe { bpf_get_netns_cookie(sa as *mut c_void) };
    // SAFETY: map lookup; the value is not dereferenced.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return 1;
    }
    // SAFETY: ctx->sk is a non-NULL PTR_TO_SOCKET for connect hooks.
    let mark = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 1;
        }
        read_volatile(&(*sk).mark)
    };
    let mut ip = [0u32; 4];
    // SAFETY: context fields, 4-byte loads.
    unsafe {
        if family == AF_INET {
            ip[0] = read_volatile(&(*sa).user_ip4);
            if is_loopback4(ip[0]) {
                return 1;
            }
        } else {
            ip[0] = read_volatile(&(*sa).user_ip6[0]);
            ip[1] = read_volatile(&(*sa).user_ip6[1]);
            ip[2] = read_volatile(&(*sa).user_ip6[2]);
            ip[3] = read_volatile(&(*sa).user_ip6[3]);
            if is_loopback6(&ip) {
                return 1;
            }
        }
    }
    // SAFETY: context field.
    let port = u16::from_be(unsafe { read_volatile(&(*sa).user_port) } as u16);
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    if mark == PROXY_MARK {
        bump(Stat::ConnectSkippedMark);
        // Perhaps the proxy delivering a tunnel to the pod it sits in (the
        // destination side of a flow, counted like the source side):
        // sockops keeps it only if it connects to its own address.
        if !is_proxy_port(port as u32) {
            let dst = OrigDst {
                ip,
                port,
                family,
                flags: ORIG_DELIVERY,
                cookie,
            };
            if CONNECT_DST.insert(&cookie, &dst, BPF_ANY as u64).is_ok() {
                bump(Stat::ConnectDelivery);
            }
        }
        return 1;
    }
    let direct = direct_allowed(netns, &ip, port, family);
    let dst = OrigDst {
        ip,
        port,
        family,
        flags: if direct { ORIG_DIRECT } else { 0 },
        cookie,
    };
    if CONNECT_DST.insert(&cookie, &dst, BPF_ANY as u64).is_err() {
        // Fail closed: without the record the proxy could not route it, and
        // letting it out unrewritten would leak plaintext.
        bump(Stat::ConnectRecordFailed);
        return 0;
    }
    if direct {
        // The kernel same-node path: the proxy authorized this destination
        // for this pod and its listener is alive; the connect goes to the
        // pod unchanged, and sockops (TCP_CONNECT_CB) registers its 4-tuple
        // before the SYN leaves, which is what the destination's sk_lookup
        // lets through.
        bump(Stat::ConnectDirect);
        return 1;
    }
    // SAFETY: connect hooks may write user_ip4/user_ip6/user_port (4 bytes).
    unsafe {
        if family == AF_INET {
            write_volatile(&mut (*sa).user_ip4, u32::from_ne_bytes([127, 0, 0, 1]));
        } else {
            write_volatile(&mut (*sa).user_ip6[0], 0);
            write_volatile(&mut (*sa).user_ip6[1], 0);
            write_volatile(&mut (*sa).user_ip6[2], 0);
            write_volatile(&mut (*sa).user_ip6[3], 1_u32.to_be());
        }
        write_volatile(&mut (*sa).user_port, OUTBOUND_PORT.to_be() as u32);
    }
    bump(Stat::ConnectRedirected);
    1
}

/// Whether the proxy authorized `ip:port` for the pod in `netns` in the
/// current generation, and that address's pod still has its proxy
/// listener (the proxy is up and has not begun to drain it).
#[inline(always)]
fn direct_allowed(netns: u64, ip: &[u32; 4], port: u16, family: u16) -> bool {
    let generation = match CONFIG.get(0) {
        Some(c) if c.direct_generation != 0 => c.direct_generation,
        _ => return false,
    };
    let key = DirectAllowKey {
        netns,
        ip: *ip,
        port,
        family,
        _pad: 0,
    };
    // SAFETY: map lookup; the value is copied out at once.
    match unsafe { DIRECT_ALLOW.get(&key) } {
        Some(a) if a.generation == generation => {}
        _ => return false,
    }
    inbound_listener_alive(&IpKey {
        ip: *ip,
        family: family as u32,
    })
}

/// Whether the proxy's inbound listener for pod address `key` is alive:
/// `sm_inbound` loses the entry when the socket closes (proxy exit, crash,
/// drain, unenroll).
#[inline(always)]
fn inbound_listener_alive(key: &IpKey) -> bool {
    // SAFETY: a lookup in a sockhash returns a referenced socket or NULL;
    // the reference is released at once. The map pointer is the map's
    // definition (SockHash is a transparent wrapper of it).
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::addr_of!(INBOUND) as *mut c_void,
            key as *const IpKey as *const c_void,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}

/// Whether `Config::flags` leaves `flag` (a switch-off flag) clear: what
/// it switches off is on (a fresh, zeroed map: everything on).
#[inline(always)]
fn not_switched_off(flag: u32) -> bool {
    CONFIG.get(0).map(|c| c.flags & flag == 0).unwrap_or(true)
}

#[inline(always)]
fn accounting_on() -> bool {
    not_switched_off(CONFIG_NO_ACCOUNTING)
}

/// The `sm_direct` key of this socket's connection, source first: `local`
/// is the source on the active side, the destination on the passive side.
#[inline(always)]
fn direct_key(k: &SockKey, local_is_source: bool) -> DirectKey {
    let (src, dst) = if local_is_source {
        ((k.local_ip, k.local_port), (k.remote_ip, k.remote_port))
    } else {
        ((k.remote_ip, k.remote_port), (k.local_ip, k.local_port))
    };
    DirectKey {
        src_ip: src.0,
        dst_ip: dst.0,
        src_port: src.1 as u16,
        dst_port: dst.1 as u16,
        family: k.family,
    }
}

// ---------------------------------------------------------------------------
// sockops
// ---------------------------------------------------------------------------

#[sock_ops]
pub fn sm_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => tcp_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
        BPF_SOCK_OPS_RTT_CB => {
            if is_tunnel(&ctx) {
                tunnel_event(&ctx, TunnelEvent::Rtt);
            } else {
                rtt_sample(&ctx);
            }
        }
        BPF_SOCK_OPS_RETRANS_CB => {
            // Arg 2: segments retransmitted; arg 3: tcp_transmit_skb's
            // result (total_retrans grows only when it is 0).
            if ctx.arg(2) == 0 && is_tunnel(&ctx) {
                tunnel_event(&ctx, TunnelEvent::Retransmit(ctx.arg(1)));
            }
        }
        BPF_SOCK_OPS_RTO_CB => {
            if is_tunnel(&ctx) {
                tunnel_event(&ctx, TunnelEvent::Rto);
            }
        }
        _ => {}
    }
    0
}

// ---------------------------------------------------------------------------
// Histograms (tunnel RTT, retransmissions, RTOs; flow durations)
// ---------------------------------------------------------------------------

#[inline(always)]
fn histograms_on() -> bool {
    not_switched_off(CONFIG_NO_HISTOGRAMS)
}

/// An HBONE tunnel end: the only sockets with 15008 at either end that get
/// callbacks (app and delivery sockets never use 15008: connect4 rewrites
/// an app's connect to it, and the proxy never delivers to its own ports).
#[inline(always)]
fn is_tunnel(ctx: &SockOpsContext) -> bool {
    // SAFETY: context fields.
    let (local, remote) = unsafe {
        (
            read_volatile(&(*ctx.ops).local_port),
            u32::from_be(read_volatile(&(*ctx.ops).remote_port)),
        )
    };
    local == HBONE_PORT as u32 || remote == HBONE_PORT as u32
}

/// The histogram entry for `key`, created (zeroed) on first use. `None`
/// when the map is full: the sample is counted as dropped.
#[inline(always)]
fn hist_entry(key: &HistKey) -> Option<*mut TcpHist> {
    if let Some(p) = TCP_HIST.get_ptr_mut(key) {
        return Some(p);
    }
    let zero = HIST_ZERO.get(0)?;
    match TCP_HIST.insert(key, zero, BPF_NOEXIST as u64) {
        Ok(()) => {}
        // Another CPU created it in between.
        Err(e) if e == -EEXIST => {}
        Err(_) => {
            bump(Stat::HistDropped);
            return None;
        }
    }
    TCP_HIST.get_ptr_mut(key)
}

/// Adds one sample `v` to the histogram of `key`.
#[inline(always)]
fn hist_record(key: &HistKey, v: u64) {
    let Some(h) = hist_entry(key) else {
        return;
    };
    let i = hist_bucket(v);
    // SAFETY: this CPU's slot of the value just returned for this key.
    unsafe {
        if let Some(b) = (*h).buckets.get_mut(i) {
            *b += 1;
        }
        (*h).count += 1;
        (*h).sum += v;
    }
}

/// The histogram key of a tunnel end.
#[inline(always)]
fn tunnel_key(ctx: &SockOpsContext) -> HistKey {
    // SAFETY: helper on our context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    let k = sockops_key(ctx, netns);
    HistKey {
        netns,
        local_ip: k.local_ip,
        remote_ip: k.remote_ip,
        family: k.family as u16,
        kind: if k.local_port == HBONE_PORT as u32 {
            HIST_TUNNEL_IN
        } else {
            HIST_TUNNEL_OUT
        },
        _pad: 0,
    }
}

enum TunnelEvent {
    Rtt,
    Retransmit(u32),
    Rto,
}

#[inline(always)]
fn tunnel_event(ctx: &SockOpsContext, ev: TunnelEvent) {
    if !histograms_on() {
        return;
    }
    let key = tunnel_key(ctx);
    match ev {
        TunnelEvent::Rtt => {
            // SAFETY: context field. The kernel keeps srtt << 3.
            let srtt = unsafe { read_volatile(&(*ctx.ops).srtt_us) } >> 3;
            hist_record(&key, srtt as u64);
        }
        TunnelEvent::Retransmit(segs) => {
            if let Some(h) = hist_entry(&key) {
                // SAFETY: this CPU's slot of the value just returned.
                unsafe { (*h).retransmits += segs as u64 };
            }
        }
        TunnelEvent::Rto => {
            if let Some(h) = hist_entry(&key) {
                // SAFETY: as above.
                unsafe { (*h).rtos += 1 };
            }
        }
    }
}

/// A tunnel end was established in an enrolled netns: its RTT samples,
/// retransmissions and RTOs feed the pair's histogram from now on (one
/// sample now: the handshake's RTT, so an idle tunnel has one too).
#[inline(always)]
fn tunnel_established(ctx: &SockOpsContext) {
    if !histograms_on() {
        return;
    }
    // SAFETY: helper on our context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    // SAFETY: map lookup; the value is not dereferenced.
    if unsafe { ENROLLED.get(&netns) }.is_none() {
        return;
    }
    let _ = ctx.set_cb_flags(
        (BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG) as i32,
    );
    tunnel_event(ctx, TunnelEvent::Rtt);
}

/// This end of the connection, keyed as `sm_socks` keys it.
#[inline(always)]
fn sockops_key(ctx: &SockOpsContext, netns: u64) -> SockKey {
    let ops = ctx.ops;
    let mut k = SockKey {
        netns,
        ..SockKey::default()
    };
    // SAFETY: context fields, 4-byte loads.
    unsafe {
        k.family = read_volatile(&(*ops).family);
        if k.family == AF_INET as u32 {
            k.local_ip[0] = read_volatile(&(*ops).local_ip4);
            k.remote_ip[0] = read_volatile(&(*ops).remote_ip4);
        } else {
            k.local_ip[0] = read_volatile(&(*ops).local_ip6[0]);
            k.local_ip[1] = read_volatile(&(*ops).local_ip6[1]);
            k.local_ip[2] = read_volatile(&(*ops).local_ip6[2]);
            k.local_ip[3] = read_volatile(&(*ops).local_ip6[3]);
            k.remote_ip[0] = read_volatile(&(*ops).remote_ip6[0]);
            k.remote_ip[1] = read_volatile(&(*ops).remote_ip6[1]);
            k.remote_ip[2] = read_volatile(&(*ops).remote_ip6[2]);
            k.remote_ip[3] = read_volatile(&(*ops).remote_ip6[3]);
        }
        k.local_port = read_volatile(&(*ops).local_port);
        // remote_port holds the network-order port in its upper half.
        k.remote_port = u32::from_be(read_volatile(&(*ops).remote_port));
    }
    k
}

/// An app's connect on the kernel same-node path, right before its SYN is
/// sent (its local port is bound by now): its 4-tuple goes into
/// `sm_direct`, the only thing the destination's sk_lookup lets through.
#[inline(always)]
fn tcp_connect(ctx: &SockOpsContext) {
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    match CONNECT_DST.get_ptr(&cookie) {
        // SAFETY: value pointer just returned for this key.
        Some(p) if unsafe { (*p).flags } & ORIG_DIRECT != 0 => {}
        _ => return,
    }
    // SAFETY: helper on our context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    let key = direct_key(&sockops_key(ctx, netns), true);
    let _ = DIRECT.insert(&key, &DirectConn { flow: cookie }, BPF_ANY as u64);
    // Its close (a refused or timed-out connect too) removes the entry.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

/// The active side of a connection we track: an app whose connect was
/// rewritten (outbound), or the proxy delivering a tunnel into its pod.
#[inline(always)]
fn active_established(ctx: &SockOpsContext) {
    if is_tunnel(ctx) {
        tunnel_established(ctx);
        return;
    }
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let dst = match CONNECT_DST.get_ptr(&cookie) {
        // SAFETY: value pointer just returned for this key.
        Some(p) => unsafe { *p },
        None => return,
    };
    // SAFETY: helper on our context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    let mut key = sockops_key(ctx, netns);
    let delivery = dst.flags & ORIG_DELIVERY != 0;
    let direct = dst.flags & ORIG_DIRECT != 0;
    if delivery {
        // Only a connection to the pod's own address is a delivery; other
        // proxy sockets (passthrough) are not ours to count.
        if key.local_ip != key.remote_ip {
            let _ = CONNECT_DST.remove(&cookie);
            return;
        }
    } else if !direct && key.remote_port != OUTBOUND_PORT as u32 {
        return;
    }
    if !direct {
        // The proxy looks the destination up when it accepts (a direct
        // connection never reaches the proxy).
        let port_key = PortKey {
            netns,
            port: key.local_port as u16,
            family: key.family as u16,
            kind: if delivery { PORT_DELIVERY } else { PORT_APP },
        };
        let _ = ORIG_DST.insert(&port_key, &dst, BPF_ANY as u64);
    }
    let mut flags = if delivery {
        FLOW_DELIVERY
    } else if direct {
        FLOW_DIRECT
    } else {
        CONFIG.get(0).map(|c| c.flow_flags).unwrap_or(0)
    };
    let redirect = flags & FLOW_REDIRECT != 0;
    flags &= FLOW_REDIRECT | FLOW_DELIVERY | FLOW_DIRECT;
    let flow = Flow {
        netns,
        // SAFETY: helper without arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        src_ip: key.local_ip,
        dst_ip: key.remote_ip,
        orig_ip: dst.ip,
        src_port: key.local_port as u16,
        dst_port: key.remote_port as u16,
        orig_port: dst.port,
        family: key.family as u16,
        state: tcp_state::ESTABLISHED,
        protocol: IPPROTO_TCP,
        flags,
        ..Flow::default()
    };
    let _ = FLOWS.insert(&cookie, &flow, BPF_ANY as u64);
    if !accounting_on() {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        return;
    }
    let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
    if !redirect {
        // Count-only: the socket is left exactly as its owner made it; its
        // acknowledged bytes are the flow's bytes_sent.
        track(ctx, cookie, cookie, ACCT_SENT, 0);
        return;
    }
    // SAFETY: ctx.ops is the sock_ops context the helper expects.
    match SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        Ok(()) => bump(Stat::SockInserted),
        Err(_) => bump(Stat::SockInsertFailed),
    }
}

/// The passive side: the proxy's end of an app's connection (accepted on
/// 15001), or an app's end of a proxy delivery.
#[inline(always)]
fn passive_established(ctx: &SockOpsContext) {
    if is_tunnel(ctx) {
        tunnel_established(ctx);
        return;
    }
    // SAFETY: helper on our context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    let mut key = sockops_key(ctx, netns);
    if let Some(p) = DIRECT.get_ptr(&direct_key(&key, false)) {
        // SAFETY: value pointer just returned for this key.
        let source = unsafe { (*p).flow };
        direct_accepted(ctx, &key, source);
        return;
    }
    let outbound = key.local_port == OUTBOUND_PORT as u32;
    let port_key = PortKey {
        netns,
        port: key.remote_port as u16,
        family: key.family as u16,
        kind: if outbound { PORT_APP } else { PORT_DELIVERY },
    };
    let dst = match ORIG_DST.get_ptr(&port_key) {
        // SAFETY: value pointer just returned for this key.
        Some(p) => unsafe { *p },
        None => return,
    };
    if !outbound && (dst.port as u32 != key.local_port || key.local_ip != key.remote_ip) {
        return;
    }
    let redirect = match FLOWS.get_ptr(&dst.cookie) {
        // SAFETY: value pointer just returned for this key.
        Some(f) => unsafe { (*f).flags & FLOW_REDIRECT != 0 },
        None => return,
    };
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    if !redirect {
        if !accounting_on() {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            return;
        }
        track(ctx, cookie, dst.cookie, ACCT_RECEIVED, 0);
        if let Some(f) = FLOWS.get_ptr_mut(&dst.cookie) {
            // SAFETY: value pointer just returned; the peer's field.
            unsafe { (*f).peer_state = PEER_OPEN };
        }
        let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
        return;
    }
    // SAFETY: ctx.ops is the sock_ops context the helper expects.
    match SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        Ok(()) => bump(Stat::SockInserted),
        Err(_) => bump(Stat::SockInsertFailed),
    }
}

/// The destination app's end of a kernel same-node connection (`source`:
/// the source app socket's cookie, its flow's key). The connection becomes
/// the destination's flow too (keyed by this socket, `FLOW_DELIVERY |
/// FLOW_DIRECT`, the source pod's address as `src`), and the two sockets
/// feed both flows: the source's acknowledged bytes are both flows'
/// `bytes_sent`, this socket's both flows' `bytes_received`.
#[inline(always)]
fn direct_accepted(ctx: &SockOpsContext, key: &SockKey, source: u64) {
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let Some(src_flow) = FLOWS.get_ptr_mut(&source) else {
        return;
    };
    let flow = Flow {
        netns: key.netns,
        // SAFETY: helper without arguments.
        start_ns: unsafe { bpf_ktime_get_ns() },
        src_ip: key.remote_ip,
        dst_ip: key.local_ip,
        orig_ip: key.local_ip,
        src_port: key.remote_port as u16,
        dst_port: key.local_port as u16,
        orig_port: key.local_port as u16,
        family: key.family as u16,
        state: tcp_state::ESTABLISHED,
        protocol: IPPROTO_TCP,
        flags: FLOW_DELIVERY | FLOW_DIRECT,
        peer_state: PEER_OPEN,
        ..Flow::default()
    };
    let _ = FLOWS.insert(&cookie, &flow, BPF_ANY as u64);
    // SAFETY: value pointer just returned; the peer's field.
    unsafe { (*src_flow).peer_state = PEER_OPEN };
    if !accounting_on() {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        return;
    }
    track(ctx, cookie, source, ACCT_RECEIVED, cookie);
    if let Some(a) = SOCK_ACCT.get_ptr_mut(&source) {
        // SAFETY: value pointer just returned (the source socket's entry,
        // keyed by its cookie); one aligned 8-byte store.
        unsafe { (*a).mirror = cookie };
    }
    let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
}

/// Makes this socket's acknowledged bytes feed `role` of flow `flow` (and
/// of `mirror`, when not 0).
#[inline(always)]
fn track(ctx: &SockOpsContext, cookie: u64, flow: u64, role: u32, mirror: u64) {
    // SAFETY: context field.
    let acked = unsafe { read_volatile(&(*ctx.ops).bytes_acked) };
    let acct = SockAcct {
        flow,
        base: acked as u32,
        role,
        mirror,
    };
    let _ = SOCK_ACCT.insert(&cookie, &acct, BPF_ANY as u64);
}

/// Adds `data` (a socket's total) to `role` of `flow`; counters only grow.
#[inline(always)]
fn feed(flow: *mut Flow, role: u32, data: u64) {
    // SAFETY: a value pointer the caller just got from `sm_flows`; this
    // socket is the only writer of the field it touches (see `Flow`).
    unsafe {
        if role == ACCT_SENT {
            if data > (*flow).bytes_sent {
                (*flow).bytes_sent = data;
            }
        } else if data > (*flow).bytes_received {
            (*flow).bytes_received = data;
        }
    }
}

/// Brings the flow counter this socket feeds up to date: its data bytes
/// the peer acknowledged, which is exactly what the peer's socket received
/// (and no byte twice). `state` is the socket's state now (the new one in
/// a state callback). Counters only grow.
#[inline(always)]
fn account_acked(ctx: &SockOpsContext, cookie: u64, state: u32) {
    let acct = match SOCK_ACCT.get_ptr(&cookie) {
        // SAFETY: value pointer just returned for this key.
        Some(p) => unsafe { *p },
        None => return,
    };
    // SAFETY: context fields.
    let (acked, una, nxt) = unsafe {
        (
            read_volatile(&(*ctx.ops).bytes_acked),
            read_volatile(&(*ctx.ops).snd_una),
            read_volatile(&(*ctx.ops).snd_nxt),
        )
    };
    // bytes_acked also counts our FIN once it is acknowledged: a FIN is
    // the last thing a socket sends, so it is acknowledged exactly when
    // everything sent is (snd_una == snd_nxt) in a state after it was
    // queued. Where that test is wrong (FIN queued but not yet sent, all
    // data acknowledged) it undercounts by one for a moment, which the
    // max below ignores; it never overcounts.
    let fin = u64::from(tcp_state::fin_queued(state) && una == nxt);
    let data = acked.saturating_sub(acct.base as u64 + fin);
    let closed = state == tcp_state::CLOSE;
    if acct.mirror != 0
        && let Some(m) = FLOWS.get_ptr_mut(&acct.mirror)
    {
        feed(m, acct.role, data);
        if closed && acct.role == ACCT_SENT {
            // The destination's flow of a kernel same-node connection:
            // the source socket is its counted peer.
            // SAFETY: value pointer just returned; the peer's field.
            unsafe { (*m).peer_state = PEER_CLOSED };
        }
    }
    if let Some(flow) = FLOWS.get_ptr_mut(&acct.flow) {
        feed(flow, acct.role, data);
        if closed && acct.role == ACCT_RECEIVED {
            // SAFETY: value pointer just returned; the peer's field.
            unsafe { (*flow).peer_state = PEER_CLOSED };
        }
    }
    if closed {
        let _ = SOCK_ACCT.remove(&cookie);
    }
}

#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    let new_state = ctx.arg(1);
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    account_acked(ctx, cookie, new_state);
    if new_state == tcp_state::CLOSE {
        direct_closed(ctx, cookie);
    }
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: value pointer just returned for this key.
    unsafe {
        (*flow).state = new_state;
        if new_state == tcp_state::CLOSE {
            let end = bpf_ktime_get_ns();
            (*flow).end_ns = end;
            let _ = CONNECT_DST.remove(&cookie);
            if (*flow).flags & FLOW_DELIVERY == 0 && histograms_on() {
                // An app connection out of its pod: its duration, keyed by
                // pod and original destination (the source reporter's
                // series). Deliveries are not: their kernel end does not
                // know the source.
                let key = HistKey {
                    netns: (*flow).netns,
                    local_ip: [0; 4],
                    remote_ip: (*flow).orig_ip,
                    family: (*flow).family,
                    kind: HIST_FLOW,
                    _pad: 0,
                };
                let ms = end.saturating_sub((*flow).start_ns) / 1_000_000;
                hist_record(&key, ms);
            }
        }
    }
}

/// A source socket of the kernel same-node path closed (or its connect
/// failed): its 4-tuple no longer opens the destination's door.
#[inline(always)]
fn direct_closed(ctx: &SockOpsContext, cookie: u64) {
    match CONNECT_DST.get_ptr(&cookie) {
        // SAFETY: value pointer just returned for this key.
        Some(p) if unsafe { (*p).flags } & ORIG_DIRECT != 0 => {}
        _ => return,
    }
    // SAFETY: helper on our context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    let _ = DIRECT.remove(&direct_key(&sockops_key(ctx, netns), true));
    let _ = CONNECT_DST.remove(&cookie);
}

#[inline(always)]
fn rtt_sample(ctx: &SockOpsContext) {
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // SAFETY: context field.
    let state = unsafe { read_volatile(&(*ctx.ops).state) };
    account_acked(ctx, cookie, state);
    if let Some(flow) = FLOWS.get_ptr_mut(&cookie) {
        // SAFETY: context field; value pointer just returned for this key.
        // The kernel keeps srtt << 3.
        unsafe { (*flow).srtt_us = read_volatile(&(*ctx.ops).srtt_us) >> 3 };
    }
}

// ---------------------------------------------------------------------------
// sk_msg
// ---------------------------------------------------------------------------

#[sk_msg]
pub fn sm_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: helper on our context.
    let netns = unsafe { bpf_get_netns_cookie(md as *mut c_void) };
    let mut key = SockKey {
        netns,
        ..SockKey::default()
    };
    // SAFETY: context fields, 4-byte loads.
    let size = unsafe {
        key.family = read_volatile(&(*md).family);
        if key.family == AF_INET as u32 {
            key.local_ip[0] = read_volatile(&(*md).local_ip4);
            key.remote_ip[0] = read_volatile(&(*md).remote_ip4);
        } else {
            key.local_ip[0] = read_volatile(&(*md).local_ip6[0]);
            key.local_ip[1] = read_volatile(&(*md).local_ip6[1]);
            key.local_ip[2] = read_volatile(&(*md).local_ip6[2]);
            key.local_ip[3] = read_volatile(&(*md).local_ip6[3]);
            key.remote_ip[0] = read_volatile(&(*md).remote_ip6[0]);
            key.remote_ip[1] = read_volatile(&(*md).remote_ip6[1]);
            key.remote_ip[2] = read_volatile(&(*md).remote_ip6[2]);
            key.remote_ip[3] = read_volatile(&(*md).remote_ip6[3]);
        }
        key.local_port = read_volatile(&(*md).local_port);
        key.remote_port = u32::from_be(read_volatile(&(*md).remote_port));
        read_volatile(&(*md).size)
    };
    // Flows of the mesh follow the flag fixed at their establishment; a pair
    // with no flow (the loader's self-test) is always redirected.
    let redirect = match account(&key, size as u64) {
        Some(flags) => flags & FLOW_REDIRECT != 0,
        None => true,
    };
    if !redirect {
        bump(Stat::MsgPassthrough);
        return sk_action::SK_PASS;
    }
    let mut peer = key.peer();
    if SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64 {
        bump(Stat::MsgRedirected);
    } else {
        bump(Stat::MsgPassthrough);
    }
    // Pass in every case: with no peer in the map the bytes take the TCP path.
    sk_action::SK_PASS
}

/// Adds a message to its flow: the app socket's sends are `bytes_sent`, the
/// proxy socket's sends are the app's `bytes_received`. Returns the flow's
/// flags, or `None` when the message belongs to no flow.
#[inline(always)]
fn account(key: &SockKey, size: u64) -> Option<u32> {
    let (app_port, sent) = if key.remote_port == OUTBOUND_PORT as u32 {
        (key.local_port, true)
    } else if key.local_port == OUTBOUND_PORT as u32 {
        (key.remote_port, false)
    } else {
        return None;
    };
    let port_key = PortKey {
        netns: key.netns,
        port: app_port as u16,
        family: key.family as u16,
        kind: PORT_APP,
    };
    let cookie = match ORIG_DST.get_ptr(&port_key) {
        // SAFETY: value pointer just returned for this key.
        Some(p) => unsafe { (*p).cookie },
        None => {
            bump(Stat::MsgUnaccounted);
            return None;
        }
    };
    match FLOWS.get_ptr_mut(&cookie) {
        // SAFETY: value pointer just returned for this key; single writer per
        // counter (see `Flow`).
        Some(flow) => unsafe {
            if sent {
                (*flow).bytes_sent += size;
            } else {
                (*flow).bytes_received += size;
            }
            Some((*flow).flags)
        },
        None => {
            bump(Stat::MsgUnaccounted);
            None
        }
    }
}

// ---------------------------------------------------------------------------
// sk_lookup
// ---------------------------------------------------------------------------

/// Inbound TCP in a captured pod's netns. Connections to the proxy's own
/// ports go to its listeners; connections the pod makes to itself (the
/// proxy delivering to the app) pass; everything else is steered
/// to the pod's 15006 listener, or dropped when there is none — the proxy
/// is down, restarting, draining, or the pod has no certificate yet. A
/// captured pod never receives plaintext the proxy did not hand it, on any
/// of its addresses (IPv4, IPv6, link-local). The program is attached only
/// to captured pods' namespaces, from capture until unenroll, and its link
/// is pinned, so this holds across a proxy crash.
#[sk_lookup]
pub fn sm_sk_lookup(ctx: SkLookupContext) -> u32 {
    let c = ctx.lookup;
    let mut key = IpKey::default();
    let mut remote = [0u32; 4];
    let (local_port, remote_port);
    // SAFETY: context fields, 4-byte loads.
    unsafe {
        if read_volatile(&(*c).protocol) != IPPROTO_TCP {
            return sk_action::SK_PASS;
        }
        local_port = read_volatile(&(*c).local_port);
        if is_proxy_port(local_port) {
            return sk_action::SK_PASS;
        }
        remote_port = u16::from_be(read_volatile(&(*c).remote_port));
        key.family = read_volatile(&(*c).family);
        if key.family == AF_INET as u32 {
            key.ip[0] = read_volatile(&(*c).local_ip4);
            remote[0] = read_volatile(&(*c).remote_ip4);
            if is_loopback4(remote[0]) {
                return sk_action::SK_PASS;
            }
        } else {
            key.ip[0] = read_volatile(&(*c).local_ip6[0]);
            key.ip[1] = read_volatile(&(*c).local_ip6[1]);
            key.ip[2] = read_volatile(&(*c).local_ip6[2]);
            key.ip[3] = read_volatile(&(*c).local_ip6[3]);
            remote[0] = read_volatile(&(*c).remote_ip6[0]);
            remote[1] = read_volatile(&(*c).remote_ip6[1]);
            remote[2] = read_volatile(&(*c).remote_ip6[2]);
            remote[3] = read_volatile(&(*c).remote_ip6[3]);
            if is_loopback6(&remote) {
                return sk_action::SK_PASS;
            }
        }
    }
    // The pod talking to itself (the proxy delivering to the app). A SYN
    // from the fabric with the pod's own address as source cannot open a
    // connection: IPv4 drops it as a martian (accept_local is off), and on
    // either family the SYN-ACK goes to the pod itself, never to the
    // sender. (`ingress_ifindex` is no help here: for a connection to a
    // local address it names the device holding the address, not `lo`.)
    if remote == key.ip {
        return sk_action::SK_PASS;
    }
    // A kernel same-node connection: its source's sockops registered this
    // exact 4-tuple before sending the SYN (only a captured app's connect
    // the proxy authorized gets there). It reaches the app while the
    // proxy's listener for this pod is alive; otherwise fail closed.
    let direct = DirectKey {
        src_ip: remote,
        dst_ip: key.ip,
        src_port: remote_port,
        dst_port: local_port as u16,
        family: key.family,
    };
    // SAFETY: map lookup; the value is not dereferenced.
    if unsafe { DIRECT.get(&direct) }.is_some() {
        if inbound_listener_alive(&key) {
            bump(Stat::LookupDirect);
            return sk_action::SK_PASS;
        }
        bump(Stat::LookupDirectRefused);
        bump(Stat::LookupRefused);
        return sk_action::SK_DROP;
    }
    match INBOUND.redirect_sk_lookup(&ctx, &key, 0) {
        Ok(()) => {
            bump(Stat::LookupSteered);
            sk_action::SK_PASS
        }
        Err(e) => {
            // No listener registered for this address, or it is gone (or
            // could not take it): fail closed.
            if e != -ENOENT {
                bump(Stat::LookupAssignFailed);
            }
            bump(Stat::LookupRefused);
            sk_action::SK_DROP
        }
    }
}
