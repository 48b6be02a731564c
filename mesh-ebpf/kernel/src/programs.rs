// Every `unsafe` here is one of: a read of a field of the context the kernel
// handed us (valid for the program's lifetime, checked by the verifier), a
// helper call with that context, or a write through a map value pointer the
// kernel just returned for this key.
use core::ffi::c_void;
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::EbpfContext as _;
use aya_ebpf::bindings::{
    BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG,
    BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, sk_action,
};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns};
use aya_ebpf::macros::{cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops, stream_verdict};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash};
use aya_ebpf::programs::{
    SkBuffContext, SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext,
};
use mesh_ebpf_common::{
    AF_INET, AF_INET6, Config, EnrolledNetns, FLOW_REDIRECT, Flow, HBONE_PORT,
    INBOUND_PLAINTEXT_PORT, IPPROTO_TCP, IpKey, MAX_ENROLLED, MAX_FLOWS, MAX_INBOUND, MAX_SOCKS,
    OUTBOUND_PORT, OrigDst, PROXY_MARK, PortKey, STAT_COUNT, SockKey, Stat, tcp_state,
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

#[map(name = "sm_proxy_flow")]
static PROXY_FLOW: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

const SOCK_STREAM: u32 = 1;
const ENOENT: i32 = 2;

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
    if mark == PROXY_MARK {
        bump(Stat::ConnectSkippedMark);
        return 1;
    }
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
    let dst = OrigDst {
        ip,
        port,
        family,
        _pad: 0,
        cookie,
    };
    if CONNECT_DST.insert(&cookie, &dst, BPF_ANY as u64).is_err() {
        // Fail closed: without the record the proxy could not route it, and
        // letting it out unrewritten would leak plaintext.
        bump(Stat::ConnectRecordFailed);
        return 0;
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

// ---------------------------------------------------------------------------
// sockops
// ---------------------------------------------------------------------------

#[sock_ops]
pub fn sm_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => active_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
        BPF_SOCK_OPS_RTT_CB => rtt_sample(&ctx),
        _ => {}
    }
    0
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

/// The app's side: its connect was rewritten, so `sm_connect_dst` knows it.
#[inline(always)]
fn active_established(ctx: &SockOpsContext) {
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
    if key.remote_port != OUTBOUND_PORT as u32 {
        return;
    }
    let port_key = PortKey {
        netns,
        port: key.local_port as u16,
        family: key.family as u16,
        _pad: 0,
    };
    let _ = ORIG_DST.insert(&port_key, &dst, BPF_ANY as u64);
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
        flags: CONFIG.get(0).map(|c| c.flow_flags).unwrap_or(0),
        ..Flow::default()
    };
    let redirect = flow.flags & FLOW_REDIRECT != 0;
    let _ = FLOWS.insert(&cookie, &flow, BPF_ANY as u64);
    let _ = ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
    // Only a redirected flow puts the app's socket in the map: otherwise the
    // app's socket is left exactly as the app made it.
    if !redirect {
        return;
    }
    // SAFETY: ctx.ops is the sock_ops context the helper expects.
    match SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        Ok(()) => bump(Stat::SockInserted),
        Err(_) => bump(Stat::SockInsertFailed),
    }
}

/// The proxy's side: accepted on the outbound listener, from an app socket
/// whose original destination was published.
#[inline(always)]
fn passive_established(ctx: &SockOpsContext) {
    // SAFETY: helper on our context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    let mut key = sockops_key(ctx, netns);
    if key.local_port != OUTBOUND_PORT as u32 {
        return;
    }
    let port_key = PortKey {
        netns,
        port: key.remote_port as u16,
        family: key.family as u16,
        _pad: 0,
    };
    let app_cookie = match ORIG_DST.get_ptr(&port_key) {
        // SAFETY: value pointer just returned for this key.
        Some(p) => unsafe { (*p).cookie },
        None => return,
    };
    // SAFETY: helper on our context.
    let proxy_cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let _ = PROXY_FLOW.insert(&proxy_cookie, &app_cookie, BPF_ANY as u64);
    // SAFETY: ctx.ops is the sock_ops context the helper expects.
    match SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        Ok(()) => bump(Stat::SockInserted),
        Err(_) => bump(Stat::SockInsertFailed),
    }
}

#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    let new_state = ctx.arg(1);
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: value pointer just returned for this key.
    unsafe {
        (*flow).state = new_state;
        if new_state == tcp_state::CLOSE {
            (*flow).end_ns = bpf_ktime_get_ns();
            let _ = CONNECT_DST.remove(&cookie);
        }
    }
}

#[inline(always)]
fn rtt_sample(ctx: &SockOpsContext) {
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
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
        _pad: 0,
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
// sk_skb stream verdict (on sm_socks): what the proxy's socket receives
// ---------------------------------------------------------------------------

/// Counts what the proxy's end of a count-only flow receives over loopback
/// TCP: the app's `bytes_sent`. Always passes the data on unchanged.
#[stream_verdict]
pub fn sm_sk_skb(ctx: SkBuffContext) -> u32 {
    // SAFETY: helper on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(app) = PROXY_FLOW.get_ptr(&cookie) {
        // SAFETY: value pointer just returned for this key.
        let app = unsafe { *app };
        if let Some(flow) = FLOWS.get_ptr_mut(&app) {
            // SAFETY: value pointer just returned for this key; the only
            // writer of bytes_sent for a count-only flow (see `Flow`).
            unsafe {
                if (*flow).flags & FLOW_REDIRECT == 0 {
                    (*flow).bytes_sent += ctx.len() as u64;
                }
            }
        }
    }
    sk_action::SK_PASS
}

// ---------------------------------------------------------------------------
// sk_lookup
// ---------------------------------------------------------------------------

#[sk_lookup]
pub fn sm_sk_lookup(ctx: SkLookupContext) -> u32 {
    let c = ctx.lookup;
    let mut key = IpKey::default();
    let mut remote = [0u32; 4];
    // SAFETY: context fields, 4-byte loads.
    unsafe {
        if read_volatile(&(*c).protocol) != IPPROTO_TCP {
            return sk_action::SK_PASS;
        }
        let port = read_volatile(&(*c).local_port);
        if port == HBONE_PORT as u32
            || port == INBOUND_PLAINTEXT_PORT as u32
            || port == OUTBOUND_PORT as u32
        {
            return sk_action::SK_PASS;
        }
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
    // From the pod itself (e.g. the proxy delivering to the app): not ours.
    if remote == key.ip {
        return sk_action::SK_PASS;
    }
    // Addresses with no enrolled pod behind them pass untouched.
    match INBOUND.redirect_sk_lookup(&ctx, &key, 0) {
        Ok(()) => bump(Stat::LookupSteered),
        Err(e) if e == -ENOENT => {}
        Err(_) => bump(Stat::LookupAssignFailed),
    }
    sk_action::SK_PASS
}
