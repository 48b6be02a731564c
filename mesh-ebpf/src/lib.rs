//! Loads, attaches, pins and reads sockmesh's eBPF programs.
//!
//! [`Datapath::install`] loads the programs once, attaches the connect hooks
//! and sockops to a cgroup and sk_msg to the socket map, and pins every link
//! and map under `<pin root>/abi-v<N>/`. A restarted process calls `install`
//! again and re-opens the pins instead of reloading, so redirection and
//! counters survive. [`uninstall`] removes every pin; once the last process
//! holding them exits, the kernel detaches and frees everything.
//!
//! The only `unsafe` in this crate reads a socket option (see `netns`),
//! detaches a pinned link (`detach_pinned_link`: two bpf(2) calls aya does
//! not offer) and implements `aya::Pod` in `mesh-ebpf-common`.
#![allow(unsafe_code)]

pub mod netns;
mod selftest;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
pub use mesh_ebpf_common::{
    ABI_VERSION, AF_INET, AF_INET6, CONFIG_NO_ACCOUNTING, CONFIG_NO_HISTOGRAMS, Config,
    DirectAllow, DirectAllowKey, EnrolledNetns, FLOW_DELIVERY, FLOW_DIRECT, FLOW_REDIRECT, Flow,
    HBONE_PORT, HIST_BUCKETS, HIST_FLOW, HIST_TUNNEL_IN, HIST_TUNNEL_OUT, HistKey,
    INBOUND_PLAINTEXT_PORT, IpKey, MAX_FLOWS, MAX_HIST, OUTBOUND_PORT, OrigDst, PEER_OPEN,
    PORT_APP, PROXY_MARK, PortKey, SockKey, Stat, TcpHist, hist_bucket, hist_bucket_max, tcp_state,
};
use mesh_ebpf_common::{map_names as maps, program_names as progs};

/// The compiled eBPF object, built by build.rs from `mesh-ebpf/kernel`.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockmesh"));

/// Where pins live by default.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/sockmesh";

/// Programs attached to the cgroup (and their link pin names).
const CGROUP_PROGRAMS: [&str; 3] = [progs::CONNECT4, progs::CONNECT6, progs::SOCKOPS];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path} is not on a bpf filesystem (found {found}): mount one with \
         `mount -t bpf bpf /sys/fs/bpf` (`./x setup` does)"
    )]
    NoBpffs { path: PathBuf, found: String },
    #[error("cgroup {path}: {source} (it must be a cgroup v2 directory)")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("program {program}: {action}: {source}")]
    Program {
        program: &'static str,
        action: String,
        #[source]
        source: ProgramError,
    },
    #[error("map {map}: {action}: {source}")]
    Map {
        map: &'static str,
        action: String,
        #[source]
        source: MapError,
    },
    #[error("pin {path}: {detail}")]
    Pin { path: PathBuf, detail: String },
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(
        "{root} holds pins of another sockmesh ABI ({found}, this build is abi-v{ABI_VERSION}): \
         run that version's uninstall, or remove {root} after stopping its proxies"
    )]
    AbiMismatch { root: PathBuf, found: String },
    #[error("sockmesh eBPF is not installed under {0} (no pinned links)")]
    NotInstalled(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A delete of a missing key: aya reports the syscall's ENOENT.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// How app<->proxy bytes move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every program is attached and the sockmap self-test passed. Flows
    /// take loopback TCP and are counted by sockops (the default, and the
    /// only mode the proxy uses); the sk_msg redirect between socket-map
    /// sockets is available to flows established with `FLOW_REDIRECT`
    /// (eBPF tests and `bench redirect` only). The name is the pinned,
    /// reported label, kept for compatibility.
    Sockmap,
    /// The self-test failed, so sk_msg is not attached: captured traffic
    /// still reaches the proxy over loopback TCP and is counted by
    /// sockops; only redirected flows are unavailable. `reason` says what
    /// failed.
    Degraded { reason: String },
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Sockmap => f.write_str("sockmap"),
            Mode::Degraded { reason } => write!(f, "degraded ({reason})"),
        }
    }
}

/// One captured app connection, read from the kernel's flow map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    /// The app socket's cookie.
    pub cookie: u64,
    pub netns: u64,
    /// The app socket's own address and the address it is connected to
    /// (the outbound listener after the rewrite).
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Where the app asked to connect.
    pub original_dst: SocketAddr,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub start_ns: u64,
    /// Zero while the flow is open.
    pub end_ns: u64,
    pub tcp_state: u32,
    pub srtt_us: u32,
    /// Whether sk_msg redirects this flow's bytes (else only counts them).
    pub redirected: bool,
    /// Whether the other end's counter may still grow (its socket is open).
    pub peer_open: bool,
    /// Which side of the mesh saw this flow: the source pod's app socket
    /// (outbound, Istio's `reporter="source"`) or the destination proxy's
    /// delivery into a pod (inbound, `reporter="destination"`).
    pub direction: Direction,
    /// A connection on the kernel same-node path: no proxy socket; an
    /// inbound flow's `src` is then the source pod's address and port.
    pub direct: bool,
}

/// Which end of a mesh connection a kernel flow describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// An app's connection out of its pod (`cookie` is the app socket's).
    /// `bytes_sent` is what the app wrote, `bytes_received` what it read.
    #[default]
    Outbound,
    /// The destination proxy's delivery into a pod (`cookie` is the proxy's
    /// socket in the pod netns). `bytes_sent` is what the source sent (what
    /// the proxy delivered to the app), `bytes_received` what the app
    /// answered, so both reporters count one direction the same way.
    Inbound,
}

impl FlowEntry {
    /// Both counted sockets are closed: the counts are final.
    pub fn is_closed(&self) -> bool {
        self.tcp_state == tcp_state::CLOSE && !self.peer_open
    }
}

/// Converts network-order address words to an address.
pub fn ip_from_words(family: u16, w: [u32; 4]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(w[0].to_ne_bytes()))
    } else {
        let mut b = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(b))
    }
}

/// Converts an address to network-order words and its family.
pub fn words_from_ip(ip: IpAddr) -> (u16, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
            }
            (AF_INET6, w)
        }
    }
}

/// The on-bpffs layout of one installation.
#[derive(Clone, Debug)]
struct Pins {
    dir: PathBuf,
}

impl Pins {
    fn new(root: &Path) -> Self {
        Pins {
            dir: root.join(format!("abi-v{ABI_VERSION}")),
        }
    }
    fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }
    fn link(&self, name: &str) -> PathBuf {
        self.dir.join("links").join(name)
    }
    fn sk_lookup_prog(&self) -> PathBuf {
        self.dir.join("progs").join(progs::SK_LOOKUP)
    }
    fn netns_link(&self, cookie: u64) -> PathBuf {
        self.dir.join("netns").join(cookie.to_string())
    }
    fn installed(&self) -> bool {
        CGROUP_PROGRAMS.iter().all(|p| self.link(p).exists())
    }
}

/// Checks that `path` (or the nearest existing ancestor) is on bpffs, by the
/// filesystem magic `statfs` reports (not by reading the mount table).
fn ensure_bpffs(path: &Path) -> Result<()> {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    // The pin root may not exist yet: its nearest existing ancestor is on
    // the filesystem it will be made on.
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let not_bpffs = |found: String| Error::NoBpffs {
        path: path.to_owned(),
        found,
    };
    let fs =
        statfs(existing).map_err(|e| not_bpffs(format!("statfs {}: {e}", existing.display())))?;
    if fs.filesystem_type() == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(not_bpffs(format!(
            "filesystem type {:#x} at {}",
            fs.filesystem_type().0,
            existing.display()
        )))
    }
}

/// A handle on the installed data path: the pinned maps, opened.
pub struct Datapath {
    pins: Pins,
    mode: Mode,
    enrolled: HashMap<MapData, u64, EnrolledNetns>,
    orig_dst: HashMap<MapData, PortKey, OrigDst>,
    flows: HashMap<MapData, u64, Flow>,
    socks: SockHash<MapData, SockKey>,
    inbound: SockHash<MapData, IpKey>,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    hist: PerCpuHashMap<MapData, HistKey, TcpHist>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pins", &self.pins.dir)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn open_map(pins: &Pins, name: &'static str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|source| Error::Map {
        map: name,
        action: format!("open pin {}", path.display()),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| Error::Map {
        map: name,
        action: "read pinned map".into(),
        source,
    })
}

macro_rules! typed_map {
    ($pins:expr, $name:expr) => {
        open_map($pins, $name)?
            .try_into()
            .map_err(|source| Error::Map {
                map: $name,
                action: "check key/value layout".into(),
                source,
            })?
    };
}

impl Datapath {
    /// Loads and attaches the programs to `cgroup` and pins them under
    /// `pin_root` — or, when a previous process already did, re-opens the
    /// pins (programs, counters and enrolled namespaces carry on). Then runs
    /// the self-test and reports the mode.
    pub fn install(cgroup: &Path, pin_root: &Path) -> Result<Self> {
        ensure_bpffs(pin_root)?;
        migrate_older_abi(pin_root)?;
        check_abi(pin_root)?;
        let pins = Pins::new(pin_root);
        if !pins.installed() {
            if pins.dir.exists() {
                // A crash half-way through an earlier install: start clean.
                tracing::warn!(pins = %pins.dir.display(), "removing an incomplete installation");
                uninstall(pin_root)?;
            }
            load_attach_pin(cgroup, &pins)?;
        }
        Self::open_pins(pins, true)
    }

    /// Opens an existing installation without attaching anything (readers:
    /// the CLI, metrics, tests).
    pub fn open(pin_root: &Path) -> Result<Self> {
        ensure_bpffs(pin_root)?;
        check_abi(pin_root)?;
        let pins = Pins::new(pin_root);
        if !pins.installed() {
            return Err(Error::NotInstalled(pin_root.to_owned()));
        }
        Self::open_pins(pins, false)
    }

    fn open_pins(pins: Pins, run_selftest: bool) -> Result<Self> {
        let mut dp = Datapath {
            enrolled: typed_map!(&pins, maps::ENROLLED),
            orig_dst: typed_map!(&pins, maps::ORIG_DST),
            flows: typed_map!(&pins, maps::FLOWS),
            socks: typed_map!(&pins, maps::SOCKS),
            inbound: typed_map!(&pins, maps::INBOUND),
            stats: typed_map!(&pins, maps::STATS),
            config: typed_map!(&pins, maps::CONFIG),
            hist: typed_map!(&pins, maps::TCP_HIST),
            mode: Mode::Sockmap,
            pins,
        };
        let sk_msg_pin = dp.pins.link(progs::SK_MSG);
        dp.mode = if !sk_msg_pin.exists() {
            Mode::Degraded {
                reason: format!("sk_msg is not attached ({} missing)", sk_msg_pin.display()),
            }
        } else if run_selftest {
            match selftest::run(&mut dp) {
                Ok(()) => Mode::Sockmap,
                Err(reason) => {
                    // Do not redirect into a broken path: detach sk_msg.
                    tracing::error!(%reason, "sockmap self-test failed; running degraded");
                    let _ = fs::remove_file(&sk_msg_pin);
                    Mode::Degraded { reason }
                }
            }
        } else {
            Mode::Sockmap
        };
        Ok(dp)
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Whether flows established from now on have their bytes redirected
    /// by sk_msg (`true`) or only counted, taking loopback TCP (`false`,
    /// the default: TCP's flow control bounds what a fast writer can queue;
    /// the redirect has no such bound). Flows already established keep
    /// their path. Has no effect in degraded mode (sk_msg not attached).
    pub fn set_redirect(&mut self, on: bool) -> Result<()> {
        self.update_config(&format!("set redirect={on}"), |cfg| {
            cfg.flow_flags = if on { FLOW_REDIRECT } else { 0 };
        })
    }

    /// Reads `sm_config`, changes it with `change`, writes it back (the
    /// caller holds `&mut self`: no other writer of this handle between).
    fn update_config(&mut self, action: &str, change: impl FnOnce(&mut Config)) -> Result<()> {
        let mut cfg = self.config_now()?;
        change(&mut cfg);
        self.config.set(0, &cfg, 0).map_err(|source| Error::Map {
            map: maps::CONFIG,
            action: action.to_owned(),
            source,
        })
    }

    /// Clears `flag` in `Config::flags` when `on`, sets it when not (the
    /// flags name what is switched off).
    fn set_off_flag(&mut self, flag: u32, on: bool, what: &str) -> Result<()> {
        self.update_config(&format!("set {what}={on}"), |cfg| {
            if on {
                cfg.flags &= !flag;
            } else {
                cfg.flags |= flag;
            }
        })
    }

    fn config_now(&self) -> Result<Config> {
        self.config.get(&0, 0).map_err(|source| Error::Map {
            map: maps::CONFIG,
            action: "read".into(),
            source,
        })
    }

    /// Whether the kernel records histograms (tunnel RTT, retransmissions,
    /// RTOs, flow durations; on by default). Off, the programs record
    /// nothing and tunnels established from then on get no per-ACK
    /// callback; tunnels already established keep their callbacks (which
    /// then return at once) until they close.
    pub fn set_histograms(&mut self, on: bool) -> Result<()> {
        self.set_off_flag(CONFIG_NO_HISTOGRAMS, on, "histograms")
    }

    /// Whether the kernel counts bytes on flows established from now on
    /// (on by default). Off, flows are still recorded (original
    /// destinations, states) with zero bytes and their sockets get no
    /// per-ACK callback: what `./x bench` uses to measure the accounting's
    /// own cost. A proxy never turns it off.
    pub fn set_accounting(&mut self, on: bool) -> Result<()> {
        self.set_off_flag(CONFIG_NO_ACCOUNTING, on, "accounting")
    }

    /// The generation of kernel same-node authorizations that connect4/6
    /// honour (0: none).
    pub fn direct_generation(&self) -> Result<u64> {
        Ok(self.config_now()?.direct_generation)
    }

    /// Makes every `sm_direct_allow` entry not of `generation` void at
    /// once (0 voids all). Connections already open are not touched.
    pub fn set_direct_generation(&mut self, generation: u64) -> Result<()> {
        self.update_config(&format!("set direct generation {generation}"), |cfg| {
            cfg.direct_generation = generation;
        })
    }

    /// A handle of its own on the same-node authorization map, for the
    /// data path (no lock shared with the control plane).
    pub fn direct_allow_table(&self) -> Result<DirectAllowTable> {
        Ok(DirectAllowTable {
            map: typed_map!(&self.pins, maps::DIRECT_ALLOW),
        })
    }

    /// What [`Datapath::set_histograms`] last set.
    pub fn histograms_on(&self) -> Result<bool> {
        Ok(self.config_now()?.flags & CONFIG_NO_HISTOGRAMS == 0)
    }

    /// Every entry of the kernel's histogram map, summed over CPUs.
    pub fn histograms(&self) -> Result<Vec<HistEntry>> {
        read_hists(&self.hist)
    }

    /// A handle of its own on the histogram map, for the metrics reader.
    pub fn hist_table(&self) -> Result<HistTable> {
        Ok(HistTable {
            map: typed_map!(&self.pins, maps::TCP_HIST),
        })
    }

    /// What [`Datapath::set_redirect`] last set.
    pub fn redirect(&self) -> Result<bool> {
        Ok(self.config_now()?.flow_flags & FLOW_REDIRECT != 0)
    }

    /// The directory holding this installation's pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// Captures the apps of the network namespace at `netns`: their TCP
    /// connects go to its outbound listener, and inbound TCP is steered to
    /// its 15006 listener (once one is registered with
    /// [`Datapath::set_inbound_listener`]). Idempotent. Returns the
    /// namespace's cookie.
    pub fn enroll(&mut self, netns: &Path) -> Result<u64> {
        let cookie = netns::cookie(netns)?;
        let link_pin = self.pins.netns_link(cookie);
        if !link_pin.exists() {
            let prog_pin = self.pins.sk_lookup_prog();
            let mut prog = SkLookup::from_pin(&prog_pin).map_err(|source| Error::Program {
                program: progs::SK_LOOKUP,
                action: format!("open pin {}", prog_pin.display()),
                source,
            })?;
            let ns = File::open(netns).map_err(io_err(netns))?;
            let id = prog.attach(&ns).map_err(|source| Error::Program {
                program: progs::SK_LOOKUP,
                action: format!("attach to netns {}", netns.display()),
                source,
            })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|source| Error::Program {
                    program: progs::SK_LOOKUP,
                    action: "take link".into(),
                    source,
                })?
                .into();
            pin_link(link, &link_pin)?;
        }
        self.enrolled
            .insert(&cookie, &EnrolledNetns::default(), 0)
            .map_err(|source| Error::Map {
                map: maps::ENROLLED,
                action: format!("enroll netns {} (cookie {cookie})", netns.display()),
                source,
            })?;
        Ok(cookie)
    }

    /// Stops capturing the namespace with this cookie. Idempotent.
    pub fn unenroll(&mut self, cookie: u64) -> Result<()> {
        match self.enrolled.remove(&cookie) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(source) => {
                return Err(Error::Map {
                    map: maps::ENROLLED,
                    action: format!("unenroll netns cookie {cookie}"),
                    source,
                });
            }
        }
        let link_pin = self.pins.netns_link(cookie);
        // Detached now: removing the pin alone frees the link only after an
        // RCU grace period and a workqueue run, during which sk_lookup
        // would still drop SYNs to a pod that is no longer captured.
        match detach_pinned_link(&link_pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&link_pin)(e)),
        }
        match fs::remove_file(&link_pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&link_pin)(e)),
        }
    }

    /// Cookies of the enrolled namespaces.
    pub fn enrolled(&self) -> Result<Vec<u64>> {
        self.enrolled
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| Error::Map {
                map: maps::ENROLLED,
                action: "list".into(),
                source,
            })
    }

    /// Where the app whose loopback socket is `app` (the peer address of a
    /// connection accepted on the outbound listener) in namespace
    /// `netns_cookie` wanted to connect.
    pub fn original_dst(&self, netns_cookie: u64, app: SocketAddr) -> Result<Option<SocketAddr>> {
        Ok(self.original(netns_cookie, app)?.map(|(dst, _)| dst))
    }

    /// Like [`Datapath::original_dst`], with the app socket's cookie: the
    /// key of the connection's entry in the flow map.
    pub fn original(
        &self,
        netns_cookie: u64,
        app: SocketAddr,
    ) -> Result<Option<(SocketAddr, u64)>> {
        lookup_original(&self.orig_dst, netns_cookie, app)
    }

    /// Every flow in the kernel's flow map, open and closed.
    pub fn flows(&self) -> Result<Vec<FlowEntry>> {
        read_flows(&self.flows)
    }

    /// A handle of its own on the original-destination map, for the data
    /// path: lookups take `&self` and no lock, so accepting a connection
    /// never waits on the control plane, admin or metrics.
    pub fn orig_dst_reader(&self) -> Result<OrigDstReader> {
        Ok(OrigDstReader {
            map: typed_map!(&self.pins, maps::ORIG_DST),
        })
    }

    /// A handle of its own on the flow map, for the metrics reader.
    pub fn flow_table(&self) -> Result<FlowTable> {
        Ok(FlowTable {
            map: typed_map!(&self.pins, maps::FLOWS),
        })
    }
}

/// The original-destination lookup of the data path (see
/// [`Datapath::orig_dst_reader`]).
pub struct OrigDstReader {
    map: HashMap<MapData, PortKey, OrigDst>,
}

impl OrigDstReader {
    /// Where the app whose loopback socket is `app` in namespace
    /// `netns_cookie` wanted to connect, and the app socket's cookie (the
    /// key of the connection's flow).
    pub fn original(
        &self,
        netns_cookie: u64,
        app: SocketAddr,
    ) -> Result<Option<(SocketAddr, u64)>> {
        lookup_original(&self.map, netns_cookie, app)
    }
}

/// The kernel same-node authorizations (see
/// [`Datapath::direct_allow_table`]): `(source pod netns, destination as
/// the app gives it)` -> the generation it was decided in.
pub struct DirectAllowTable {
    map: HashMap<MapData, DirectAllowKey, DirectAllow>,
}

impl DirectAllowTable {
    /// Lets the apps of netns `netns_cookie` connect to `dst` without the
    /// proxy while the map's generation is `generation`. When the map is
    /// full it is emptied first (entries are only a cache of decisions).
    pub fn allow(&mut self, netns_cookie: u64, dst: SocketAddr, generation: u64) -> Result<()> {
        let (family, ip) = words_from_ip(dst.ip());
        let key = DirectAllowKey {
            netns: netns_cookie,
            ip,
            port: dst.port(),
            family,
            _pad: 0,
        };
        let value = DirectAllow { generation };
        let err = |source| Error::Map {
            map: maps::DIRECT_ALLOW,
            action: format!("allow {dst} for netns {netns_cookie}"),
            source,
        };
        match self.map.insert(&key, &value, 0) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                self.clear()?;
                self.map.insert(&key, &value, 0).map_err(err)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Removes every entry.
    pub fn clear(&mut self) -> Result<()> {
        let keys: Vec<DirectAllowKey> = self.map.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            match self.map.remove(&k) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(source) => {
                    return Err(Error::Map {
                        map: maps::DIRECT_ALLOW,
                        action: "clear".into(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// How many entries there are (for `/stats`).
    pub fn len(&self) -> usize {
        self.map.keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The flow map, for a reader that folds and forgets closed flows (see
/// [`Datapath::flow_table`]).
pub struct FlowTable {
    map: HashMap<MapData, u64, Flow>,
}

impl FlowTable {
    pub fn flows(&self) -> Result<Vec<FlowEntry>> {
        read_flows(&self.map)
    }

    /// Removes a flow (closed flows, once folded into totals). Idempotent.
    pub fn forget(&mut self, cookie: u64) -> Result<()> {
        forget_flow(&mut self.map, cookie)
    }
}

/// What an entry of the histogram map describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HistKind {
    /// The client end of the HBONE tunnels from the pod of `netns`
    /// (`local`) to the pod at `remote`: RTT in microseconds,
    /// retransmissions, RTOs.
    TunnelOut,
    /// The server end of the tunnels into the pod of `netns` (`local`)
    /// from the pod at `remote`.
    TunnelIn,
    /// Outbound connections of the pod of `netns` to original destination
    /// `remote`: durations in milliseconds.
    FlowDuration,
}

/// One entry of the kernel's histogram map, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistEntry {
    /// The raw key (what [`HistTable::forget`] takes).
    pub key: HistKey,
    pub kind: HistKind,
    pub netns: u64,
    /// This end's pod address (`None` for flow durations); IPv4-mapped
    /// addresses as IPv4.
    pub local: Option<IpAddr>,
    /// The other end: the peer pod (tunnels) or the original destination.
    pub remote: IpAddr,
    pub hist: TcpHist,
}

fn hist_entry(key: HistKey, per_cpu: &[TcpHist]) -> Option<HistEntry> {
    let kind = match key.kind {
        HIST_TUNNEL_OUT => HistKind::TunnelOut,
        HIST_TUNNEL_IN => HistKind::TunnelIn,
        HIST_FLOW => HistKind::FlowDuration,
        _ => return None,
    };
    let mut hist = TcpHist::default();
    for h in per_cpu {
        for (sum, b) in hist.buckets.iter_mut().zip(h.buckets) {
            *sum = sum.saturating_add(b);
        }
        hist.count = hist.count.saturating_add(h.count);
        hist.sum = hist.sum.saturating_add(h.sum);
        hist.retransmits = hist.retransmits.saturating_add(h.retransmits);
        hist.rtos = hist.rtos.saturating_add(h.rtos);
    }
    Some(HistEntry {
        key,
        kind,
        netns: key.netns,
        // A dual-stack listener's tunnels carry IPv4 peers as
        // `::ffff:a.b.c.d`: shown (and joined to pods) as `a.b.c.d`.
        local: (kind != HistKind::FlowDuration)
            .then(|| ip_from_words(key.family, key.local_ip).to_canonical()),
        remote: ip_from_words(key.family, key.remote_ip).to_canonical(),
        hist,
    })
}

fn read_hists(map: &PerCpuHashMap<MapData, HistKey, TcpHist>) -> Result<Vec<HistEntry>> {
    let mut out = Vec::new();
    for item in map.iter() {
        match item {
            Ok((key, values)) => out.extend(hist_entry(key, &values)),
            // Deleted between the key walk and the read.
            Err(e) if is_not_found(&e) => {}
            Err(source) => {
                return Err(Error::Map {
                    map: maps::TCP_HIST,
                    action: "iterate".into(),
                    source,
                });
            }
        }
    }
    Ok(out)
}

/// The histogram map, for the metrics reader (see [`Datapath::hist_table`]).
pub struct HistTable {
    map: PerCpuHashMap<MapData, HistKey, TcpHist>,
}

impl HistTable {
    pub fn entries(&self) -> Result<Vec<HistEntry>> {
        read_hists(&self.map)
    }

    /// Removes an entry (its pod is gone; the reader keeps its last
    /// values). Idempotent.
    pub fn forget(&mut self, key: &HistKey) -> Result<()> {
        match self.map.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(Error::Map {
                map: maps::TCP_HIST,
                action: format!("remove netns {} kind {}", key.netns, key.kind),
                source,
            }),
        }
    }
}

fn lookup_original(
    map: &HashMap<MapData, PortKey, OrigDst>,
    netns_cookie: u64,
    app: SocketAddr,
) -> Result<Option<(SocketAddr, u64)>> {
    let family = if app.is_ipv4() { AF_INET } else { AF_INET6 };
    let key = PortKey {
        netns: netns_cookie,
        port: app.port(),
        family,
        kind: PORT_APP,
    };
    match map.get(&key, 0) {
        Ok(d) => Ok(Some((
            SocketAddr::new(ip_from_words(d.family, d.ip), d.port),
            d.cookie,
        ))),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(Error::Map {
            map: maps::ORIG_DST,
            action: format!("look up netns {netns_cookie} port {}", app.port()),
            source,
        }),
    }
}

fn forget_flow(map: &mut HashMap<MapData, u64, Flow>, cookie: u64) -> Result<()> {
    match map.remove(&cookie) {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(source) => Err(Error::Map {
            map: maps::FLOWS,
            action: format!("remove flow {cookie}"),
            source,
        }),
    }
}

fn read_flows(map: &HashMap<MapData, u64, Flow>) -> Result<Vec<FlowEntry>> {
    {
        let mut out = Vec::new();
        for item in map.iter() {
            let (cookie, f) = item.map_err(|source| Error::Map {
                map: maps::FLOWS,
                action: "iterate".into(),
                source,
            })?;
            out.push(FlowEntry {
                cookie,
                netns: f.netns,
                src: SocketAddr::new(ip_from_words(f.family, f.src_ip), f.src_port),
                dst: SocketAddr::new(ip_from_words(f.family, f.dst_ip), f.dst_port),
                original_dst: SocketAddr::new(ip_from_words(f.family, f.orig_ip), f.orig_port),
                bytes_sent: f.bytes_sent,
                bytes_received: f.bytes_received,
                start_ns: f.start_ns,
                end_ns: f.end_ns,
                tcp_state: f.state,
                srtt_us: f.srtt_us,
                redirected: f.flags & FLOW_REDIRECT != 0,
                peer_open: f.peer_state == PEER_OPEN,
                direction: if f.flags & FLOW_DELIVERY != 0 {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
                direct: f.flags & FLOW_DIRECT != 0,
            });
        }
        Ok(out)
    }
}

impl Datapath {
    /// Removes a flow (closed flows, once folded into totals by the reader).
    pub fn forget_flow(&mut self, cookie: u64) -> Result<()> {
        forget_flow(&mut self.flows, cookie)
    }

    /// The kernel's event counters, summed over CPUs.
    pub fn stats(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        for s in Stat::ALL {
            let per_cpu = self
                .stats
                .get(&(s as u32), 0)
                .map_err(|source| Error::Map {
                    map: maps::STATS,
                    action: format!("read {}", s.name()),
                    source,
                })?;
            out.insert(s.name(), per_cpu.iter().sum());
        }
        Ok(out)
    }

    /// Registers the 15006 listener of the pod with address `pod_ip`: inbound
    /// TCP to that address (not HBONE, not from the pod itself) lands on it.
    pub fn set_inbound_listener(&mut self, pod_ip: IpAddr, listener: &impl AsRawFd) -> Result<()> {
        let (family, ip) = words_from_ip(pod_ip);
        let key = IpKey {
            ip,
            family: family as u32,
        };
        self.inbound
            .insert(&key, listener.as_raw_fd(), 0)
            .map_err(|source| Error::Map {
                map: maps::INBOUND,
                action: format!("register inbound listener of {pod_ip}"),
                source,
            })
    }

    /// Forgets the inbound listener of `pod_ip`. Idempotent.
    pub fn remove_inbound_listener(&mut self, pod_ip: IpAddr) -> Result<()> {
        let (family, ip) = words_from_ip(pod_ip);
        let key = IpKey {
            ip,
            family: family as u32,
        };
        match self.inbound.remove(&key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(Error::Map {
                map: maps::INBOUND,
                action: format!("remove inbound listener of {pod_ip}"),
                source,
            }),
        }
    }

    /// Kernel ids of the installation's programs, maps and links (what
    /// `bpftool prog/map/link show id N` takes).
    pub fn kernel_ids(&self) -> Result<KernelIds> {
        kernel_ids(&self.pins)
    }
}

/// Kernel object ids behind an installation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelIds {
    pub programs: Vec<u32>,
    pub maps: Vec<u32>,
    pub links: Vec<u32>,
}

fn kernel_ids(pins: &Pins) -> Result<KernelIds> {
    let mut ids = KernelIds::default();
    for name in maps::ALL {
        let path = pins.map(name);
        let data = MapData::from_pin(&path).map_err(|source| Error::Map {
            map: name,
            action: format!("open pin {}", path.display()),
            source,
        })?;
        let info = data.info().map_err(|source| Error::Map {
            map: name,
            action: "info".into(),
            source,
        })?;
        ids.maps.push(info.id());
    }
    let mut link_pins: Vec<PathBuf> = [
        progs::CONNECT4,
        progs::CONNECT6,
        progs::SOCKOPS,
        progs::SK_MSG,
    ]
    .iter()
    .map(|p| pins.link(p))
    .collect();
    if let Ok(rd) = fs::read_dir(pins.dir.join("netns")) {
        link_pins.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    for path in link_pins.into_iter().filter(|p| p.exists()) {
        let link = PinnedLink::from_pin(&path).map_err(|e| Error::Pin {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let fd: FdLink = link.into();
        let info = fd.info().map_err(|e| Error::Pin {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        ids.links.push(info.id());
        ids.programs.push(info.program_id());
    }
    let prog_pin = pins.sk_lookup_prog();
    let prog = SkLookup::from_pin(&prog_pin).map_err(|source| Error::Program {
        program: progs::SK_LOOKUP,
        action: format!("open pin {}", prog_pin.display()),
        source,
    })?;
    let info = prog.info().map_err(|source| Error::Program {
        program: progs::SK_LOOKUP,
        action: "info".into(),
        source,
    })?;
    ids.programs.push(info.id());
    ids.programs.sort_unstable();
    ids.programs.dedup();
    Ok(ids)
}

/// An upgrade: pins of an older ABI under `pin_root` are removed (their
/// programs detach once no process holds them) so this version installs
/// its own. Flows and counters of the old layout do not carry over (the
/// proxy's persisted metric totals do). A newer ABI is never touched.
fn migrate_older_abi(pin_root: &Path) -> Result<()> {
    let Ok(rd) = fs::read_dir(pin_root) else {
        return Ok(());
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let older = name
            .strip_prefix("abi-v")
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|v| v < ABI_VERSION);
        if older {
            tracing::warn!(pins = %e.path().display(), to = ABI_VERSION, "migrating: removing the pins of an older sockmesh ABI");
            let mut report = UninstallReport::default();
            remove_tree(&e.path(), &mut report)?;
        }
    }
    Ok(())
}

/// Refuses pin roots that hold another ABI version's pins.
fn check_abi(pin_root: &Path) -> Result<()> {
    let Ok(rd) = fs::read_dir(pin_root) else {
        return Ok(());
    };
    let ours = format!("abi-v{ABI_VERSION}");
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("abi-v") && name != ours {
            return Err(Error::AbiMismatch {
                root: pin_root.to_owned(),
                found: name,
            });
        }
    }
    Ok(())
}

/// Detaches the bpf_link pinned at `path` at once (`BPF_LINK_DETACH`, which
/// aya does not offer): the program stops running before this returns,
/// whoever still holds the link. The pin stays (an empty link) until
/// removed.
fn detach_pinned_link(path: &Path) -> io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    // enum bpf_cmd (include/uapi/linux/bpf.h).
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    /// `union bpf_attr` as BPF_OBJ_GET reads it.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    /// `union bpf_attr` as BPF_LINK_DETACH reads it.
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let get = ObjGet {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: bpf(2) with a valid BPF_OBJ_GET attribute of the size given;
    // `name` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGet,
            std::mem::size_of::<ObjGet>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let detach = LinkDetach {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: bpf(2) with a valid BPF_LINK_DETACH attribute of the size
    // given, on a descriptor we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &detach as *const LinkDetach,
            std::mem::size_of::<LinkDetach>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pin_link(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path).map(drop).map_err(|e| Error::Pin {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn program_err(
    program: &'static str,
    action: impl Into<String>,
) -> impl FnOnce(ProgramError) -> Error {
    let action = action.into();
    move |source| Error::Program {
        program,
        action,
        source,
    }
}

/// Loads program `$name` of type `$ty`, attaches it with `$attach` (which
/// sees the program as `$p`), and pins the resulting bpf_link.
macro_rules! attach_and_pin {
    ($ebpf:expr, $pins:expr, $ty:ty, $name:expr, $what:expr, |$p:ident| $attach:expr) => {{
        let name: &'static str = $name;
        let $p: &mut $ty = program_mut($ebpf, name)?;
        $p.load().map_err(program_err(name, "load"))?;
        let id = $attach.map_err(program_err(name, format!("attach to {}", $what)))?;
        let link: FdLink = $p
            .take_link(id)
            .map_err(program_err(name, "take link"))?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| Error::Pin {
                path: $pins.link(name),
                detail: format!("{name} link is not a bpf_link: {e}"),
            })?;
        pin_link(link, &$pins.link(name))?;
    }};
}

fn load_attach_pin(cgroup: &Path, pins: &Pins) -> Result<()> {
    let cg = File::open(cgroup).map_err(|source| Error::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    for sub in ["maps", "links", "progs", "netns"] {
        let d = pins.dir.join(sub);
        fs::create_dir_all(&d).map_err(io_err(&d))?;
    }
    let mut ebpf: Ebpf = EbpfLoader::new().load(PROGRAMS).map_err(Error::Load)?;
    for name in maps::ALL {
        let path = pins.map(name);
        let map = ebpf.map(name).ok_or(Error::Map {
            map: name,
            action: "find in object".into(),
            source: MapError::InvalidName { name: name.into() },
        })?;
        map.pin(&path).map_err(|e| Error::Pin {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    }

    // sk_lookup: loaded and pinned now, attached per netns on enroll.
    {
        let prog: &mut SkLookup = program_mut(&mut ebpf, progs::SK_LOOKUP)?;
        prog.load().map_err(program_err(progs::SK_LOOKUP, "load"))?;
        let path = pins.sk_lookup_prog();
        prog.pin(&path).map_err(|e| Error::Pin {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    }

    // sk_msg and the stream verdict on the socket map, before anything can
    // fill the map; then sockops, so every connection the connect hooks
    // rewrite is seen established; then the connect hooks. With bpf_link
    // (kernel >= 5.7) `CgroupAttachMode::Single` (flags 0) still coexists
    // with other programs on the cgroup: links are multi-attach by nature
    // and the kernel rejects BPF_F_ALLOW_MULTI there.
    let socks_fd = {
        let socks: SockHash<_, SockKey> = SockHash::try_from(
            ebpf.map(maps::SOCKS)
                .ok_or(Error::MissingProgram(maps::SOCKS))?,
        )
        .map_err(|source| Error::Map {
            map: maps::SOCKS,
            action: "open".into(),
            source,
        })?;
        socks
            .fd()
            .try_clone()
            .map_err(io_err(&pins.map(maps::SOCKS)))?
    };
    let socks_what = format!("map {}", maps::SOCKS);
    let cgroup_what = format!("cgroup {}", cgroup.display());
    attach_and_pin!(&mut ebpf, pins, SkMsg, progs::SK_MSG, &socks_what, |p| p
        .attach(&socks_fd));
    attach_and_pin!(
        &mut ebpf,
        pins,
        SockOps,
        progs::SOCKOPS,
        &cgroup_what,
        |p| p.attach(&cg, CgroupAttachMode::Single)
    );
    for name in [progs::CONNECT4, progs::CONNECT6] {
        attach_and_pin!(&mut ebpf, pins, CgroupSockAddr, name, &cgroup_what, |p| p
            .attach(&cg, CgroupAttachMode::Single));
    }
    Ok(())
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    prog.try_into()
        .map_err(program_err(name, "check program type"))
}

/// What [`uninstall`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UninstallReport {
    /// Pins removed (links, programs, maps).
    pub pins: Vec<PathBuf>,
}

/// Removes every pin under `pin_root` (this ABI's and any other's): links
/// detach and programs and maps are freed once no process holds them.
/// Safe to call when nothing is installed.
pub fn uninstall(pin_root: &Path) -> Result<UninstallReport> {
    let mut report = UninstallReport::default();
    if !pin_root.exists() {
        return Ok(report);
    }
    ensure_bpffs(pin_root)?;
    remove_tree(pin_root, &mut report)?;
    Ok(report)
}

fn remove_tree(dir: &Path, report: &mut UninstallReport) -> Result<()> {
    // Links first, so programs stop running before their maps go.
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort_by_key(|p| match p.file_name().and_then(|n| n.to_str()) {
        Some("links") | Some("netns") => 0,
        Some("progs") => 1,
        _ => 2,
    });
    for path in entries {
        if path.is_dir() {
            remove_tree(&path, report)?;
        } else {
            fs::remove_file(&path).map_err(io_err(&path))?;
            report.pins.push(path);
        }
    }
    fs::remove_dir(dir).map_err(io_err(dir))?;
    Ok(())
}

/// Mounts bpffs at `path` if nothing is mounted there. Returns whether it
/// mounted.
pub fn mount_bpffs(path: &Path) -> Result<bool> {
    if ensure_bpffs(path).is_ok() {
        return Ok(false);
    }
    fs::create_dir_all(path).map_err(io_err(path))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| io_err(path)(io::Error::from(e)))?;
    Ok(true)
}

/// Wall-clock-free age of a flow start (`CLOCK_MONOTONIC` nanoseconds).
pub fn age(start_ns: u64) -> Duration {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(start_ns);
    Duration::from_nanos(now.saturating_sub(start_ns))
}

#[cfg(test)]
mod bpffs_tests {
    use super::*;

    #[test]
    fn a_path_off_bpffs_is_refused_with_what_was_found() {
        let dir = std::env::temp_dir().join("sockmesh-not-bpffs/pins");
        let e = ensure_bpffs(&dir).unwrap_err().to_string();
        assert!(e.contains("is not on a bpf filesystem"), "{e}");
        assert!(e.contains("filesystem type 0x"), "{e}");
    }

    #[test]
    fn a_path_on_bpffs_is_accepted_before_it_exists() {
        // Only where bpffs is mounted (privileged hosts); elsewhere the
        // refusal above is the behaviour under test.
        if ensure_bpffs(Path::new("/sys/fs/bpf")).is_ok() {
            assert!(ensure_bpffs(Path::new("/sys/fs/bpf/sockmesh-none/abi")).is_ok());
        }
    }
}
