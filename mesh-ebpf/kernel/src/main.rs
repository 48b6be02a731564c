//! sockmesh's eBPF programs. Built for `bpfel-unknown-none` by the loader's
//! build.rs (aya-build, pinned nightly); on the host this crate is empty.
//!
//! - `sm_connect4` / `sm_connect6` (cgroup/connect4, cgroup/connect6): in an
//!   enrolled netns, rewrite a TCP connect to the in-pod outbound listener and
//!   record where the app wanted to go.
//! - `sm_sockops` (sockops): put both ends of app<->proxy loopback connections
//!   in `sm_socks`, publish the original destination by (netns, port), start
//!   the flow's accounting, track its TCP state; on HBONE tunnel ends (port
//!   15008) feed the RTT histogram and retransmit/RTO counts of the pod
//!   pair, and at an app socket's close its flow's duration
//!   (`sm_tcp_hist`).
//! - `sm_sk_msg` (sk_msg on `sm_socks`): count the bytes, then redirect each
//!   send to the peer socket's ingress queue.
//! - `sm_sk_lookup` (sk_lookup, per pod netns): steer inbound TCP that is not
//!   HBONE and not from the pod itself to the pod's 15006 listener.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
