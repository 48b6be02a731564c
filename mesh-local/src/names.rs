//! Names of everything the harness creates. Every object starts with
//! `sockmesh-<mesh>-` (or lives inside a namespace or cgroup that does), and
//! every name fits its kernel limit: long names are cut and end in a hash of
//! the full name, so they stay distinct and stable across runs.

use std::fmt::Write as _;

/// Prefix of every object of every local mesh.
pub const PREFIX: &str = "sockmesh-";
/// Longest network namespace name we make (iproute2 takes longer ones; this
/// keeps `ip netns list` readable and paths short).
pub const NETNS_MAX: usize = 63;
/// `IFNAMSIZ - 1`.
pub const IFNAME_MAX: usize = 15;
/// Longest cgroup directory name we make (the kernel allows 255).
pub const CGROUP_NAME_MAX: usize = 120;
/// Longest mesh name: keeps room for node and pod names in netns names.
pub const MESH_NAME_MAX: usize = 16;

/// The bridge inside the fabric netns.
pub const BRIDGE: &str = "br0";
/// A node's interface to the fabric, inside the node netns.
pub const NODE_FABRIC_IF: &str = "fabric0";
/// A pod's interface, inside the pod netns.
pub const POD_IF: &str = "eth0";

/// Checks a mesh name: 1–16 lowercase letters and digits, starting with a
/// letter. No `-`, so `sockmesh-<mesh>-` never is a prefix of another mesh's
/// objects, and not `t<digits>`, the test sandbox's pattern.
pub fn validate_mesh_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MESH_NAME_MAX {
        return Err("longer than 16 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err("only lowercase letters and digits are allowed");
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return Err("must start with a letter");
    }
    if name.len() > 1 && name.starts_with('t') && name[1..].bytes().all(|b| b.is_ascii_digit()) {
        return Err("t<digits> is the test sandbox's pattern (sockmesh-t<pid>-...)");
    }
    Ok(())
}

/// `sockmesh-<mesh>-`: every netns and pin of the mesh starts with it.
pub fn mesh_prefix(mesh: &str) -> String {
    format!("{PREFIX}{mesh}-")
}

/// `sockmesh-<mesh>`: the mesh's cgroup directory.
pub fn mesh_cgroup(mesh: &str) -> String {
    format!("{PREFIX}{mesh}")
}

pub fn fabric_netns(mesh: &str) -> String {
    fit(&format!("{PREFIX}{mesh}-fabric"), NETNS_MAX)
}

pub fn node_netns(mesh: &str, node: &str) -> String {
    fit(&format!("{PREFIX}{mesh}-{node}"), NETNS_MAX)
}

pub fn pod_netns(mesh: &str, namespace: &str, pod: &str) -> String {
    fit(&format!("{PREFIX}{mesh}-{namespace}-{pod}"), NETNS_MAX)
}

/// A node's bpffs pin root: `/sys/fs/bpf/sockmesh-<mesh>-<node>` (each node
/// simulates its own kernel view, so each has its own pins).
pub fn node_pin_root(mesh: &str, node: &str) -> String {
    fit(&format!("{PREFIX}{mesh}-{node}"), NETNS_MAX)
}

/// `node-<name>` under the mesh cgroup.
pub fn node_cgroup(node: &str) -> String {
    fit(&format!("node-{node}"), CGROUP_NAME_MAX)
}

/// `<namespace>_<pod>` under the node's `pods/` cgroup.
pub fn pod_cgroup(namespace: &str, pod: &str) -> String {
    fit(&format!("{namespace}_{pod}"), CGROUP_NAME_MAX)
}

/// The node's end of its fabric veth, inside the fabric netns.
pub fn fabric_veth(node: &str) -> String {
    let short = format!("n-{node}");
    if short.len() <= IFNAME_MAX {
        short
    } else {
        format!("smn{}", hash8(node))
    }
}

/// The node's end of a pod's veth, inside the node netns (`smp` + hash of
/// `namespace/pod`; the state file maps it back).
pub fn pod_veth(namespace: &str, pod: &str) -> String {
    format!("smp{}", hash8(&format!("{namespace}/{pod}")))
}

/// `name` if it fits in `max` bytes; otherwise its first bytes, `-` and
/// eight hex digits of a hash of the whole name. Names are ASCII.
pub fn fit(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let keep = max.saturating_sub(9);
    let mut cut = name.get(..keep).unwrap_or(name).to_owned();
    while cut.ends_with(['-', '.', '_']) {
        cut.pop();
    }
    let _ = write!(cut, "-{}", hash8(name));
    cut
}

/// FNV-1a, 64 bits: stable across runs and platforms.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn hash8(s: &str) -> String {
    let h = fnv64(s.as_bytes());
    format!("{:08x}", (h ^ (h >> 32)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept() {
        assert_eq!(fabric_netns("demo"), "sockmesh-demo-fabric");
        assert_eq!(node_netns("demo", "node-a"), "sockmesh-demo-node-a");
        assert_eq!(
            pod_netns("demo", "default", "client"),
            "sockmesh-demo-default-client"
        );
        assert_eq!(node_cgroup("node-a"), "node-node-a");
        assert_eq!(pod_cgroup("default", "web"), "default_web");
        assert_eq!(fabric_veth("node-a"), "n-node-a");
    }

    #[test]
    fn long_names_are_shortened_within_limits_and_stay_distinct() {
        let long_pod = "a".repeat(200);
        let a = pod_netns("demo", "default", &long_pod);
        let b = pod_netns("demo", "default", &format!("{long_pod}b"));
        assert!(a.len() <= NETNS_MAX && b.len() <= NETNS_MAX, "{a} {b}");
        assert!(a.starts_with("sockmesh-demo-default-aaa"), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, pod_netns("demo", "default", &long_pod), "stable");

        let v = pod_veth("default", &long_pod);
        assert!(v.len() <= IFNAME_MAX && v.starts_with("smp"), "{v}");
        assert_ne!(v, pod_veth("default", &format!("{long_pod}b")));
        let f = fabric_veth("a-very-long-node-name");
        assert!(f.len() <= IFNAME_MAX && f.starts_with("smn"), "{f}");
        let c = pod_cgroup("default", &long_pod);
        assert!(c.len() <= CGROUP_NAME_MAX, "{c}");
        // A cut never leaves a dangling separator before the hash.
        let cut = fit(&format!("{}-{}", "x".repeat(53), "y".repeat(20)), 63);
        assert_eq!(cut.len(), 62, "{cut}");
        assert!(!cut.contains("--"), "{cut}");
    }

    #[test]
    fn mesh_names() {
        for ok in ["demo", "a", "mesh2", "l12345x0"] {
            assert_eq!(validate_mesh_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Demo", "my-mesh", "2mesh", "t123", "abcdefghijklmnopq"] {
            assert!(validate_mesh_name(bad).is_err(), "{bad}");
        }
    }
}
