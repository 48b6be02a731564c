//! Address assignment. The whole mesh lives in `10.77.0.0/16` (and
//! `fd77::/48`), inside namespaces the harness made:
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | fabric (bridge in the fabric netns) | `10.77.0.0/24` | `fd77::/64` |
//! | node *i* (1-based, file order) on the fabric | `10.77.0.i` | `fd77::i` |
//! | pod CIDR of node *i* | `10.77.i.0/24` | `fd77:0:0:i::/64` |
//! | pods' gateway (node end of every pod veth) | `10.77.i.1` | `fe80::1` |
//! | pod *k* of node *i* (`k` = 2..=254) | `10.77.i.k/32` | `fd77:0:0:i::k/128` |
//! | service VIPs | `10.77.240.0/20` | — |
//!
//! Pods have /32 (/128) addresses and a route to the gateway, so pods on one
//! node never ARP for each other; the node routes between its veths and,
//! over the fabric, to the other nodes' pod CIDRs.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::names::fnv64;
use crate::topology::{Topology, TopologyError};

pub const FABRIC_V4: &str = "10.77.0.0/24";
pub const FABRIC_V6: &str = "fd77::/64";
pub const SERVICE_V4: &str = "10.77.240.0/20";
pub const FIRST_POD_HOST: u8 = 2;
pub const LAST_POD_HOST: u8 = 254;
/// Host addresses in the /20 service range.
const SERVICE_HOSTS: u32 = 4094;
/// The pods' IPv6 gateway: link-local, on every pod veth's node end.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Node `index` (1-based) on the fabric.
pub fn fabric_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, index)
}

pub fn fabric_ip6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, u16::from(index))
}

/// `10.77.<index>.0/24`.
pub fn pod_cidr(index: u8) -> String {
    format!("10.77.{index}.0/24")
}

/// `fd77:0:0:<index>::/64`.
pub fn pod_cidr6(index: u8) -> String {
    format!(
        "{}/64",
        Ipv6Addr::new(0xfd77, 0, 0, u16::from(index), 0, 0, 0, 0)
    )
}

/// The pods' IPv4 gateway on node `index`.
pub fn gateway(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, index, 1)
}

fn pod_ip6(index: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, u16::from(index), 0, 0, 0, host)
}

fn in_service_range(ip: Ipv4Addr) -> bool {
    let [a, b, c, d] = ip.octets();
    a == 10 && b == 77 && c >= 240 && !(c == 240 && d == 0) && !(c == 255 && d == 255)
}

/// Node `name`'s 1-based index (its position in the file).
pub fn node_index(topology: &Topology, name: &str) -> Option<u8> {
    let pos = topology.nodes.iter().position(|n| n.name == name)?;
    u8::try_from(pos + 1).ok()
}

/// A stable pod UID (UUID v4 layout) derived from namespace and name.
pub fn pod_uid(namespace: &str, name: &str) -> String {
    let a = fnv64(format!("uid/{namespace}/{name}").as_bytes());
    let b = fnv64(format!("uid2/{namespace}/{name}").as_bytes());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0xfff,
        b & 0xffff_ffff_ffff
    )
}

/// Fills in every pod's uid and addresses and every service's VIP, checking
/// the ones given. `ipv6` adds an IPv6 address to each pod.
pub fn resolve(topology: &Topology, ipv6: bool, origin: &str) -> Result<Topology, TopologyError> {
    topology.validate(origin)?;
    let invalid = |what: String, reason: String| TopologyError::Invalid {
        origin: origin.to_owned(),
        what,
        reason,
    };
    let mut out = topology.clone();

    // Explicit addresses first, so the automatic ones go around them.
    let mut used_v4 = BTreeSet::new();
    let mut used_v6 = BTreeSet::new();
    for p in &out.pods {
        let what = format!("pod {}/{}", p.namespace, p.name);
        let index = node_index(topology, &p.node)
            .ok_or_else(|| invalid(what.clone(), format!("node {:?} unknown", p.node)))?;
        for ip in &p.ips {
            match ip {
                IpAddr::V4(v4) => {
                    let [a, b, c, d] = v4.octets();
                    if (a, b, c) != (10, 77, index)
                        || !(FIRST_POD_HOST..=LAST_POD_HOST).contains(&d)
                    {
                        return Err(invalid(
                            what,
                            format!(
                                "ip {v4}: not in node {}'s pod range 10.77.{index}.{FIRST_POD_HOST}-{LAST_POD_HOST}",
                                p.node
                            ),
                        ));
                    }
                    if !used_v4.insert(*v4) {
                        return Err(invalid(what, format!("ip {v4} is used twice")));
                    }
                }
                IpAddr::V6(v6) => {
                    if !ipv6 {
                        return Err(invalid(what, format!("ip {v6}: IPv6 is off in this mesh")));
                    }
                    let s = v6.segments();
                    if s[..4] != [0xfd77, 0, 0, u16::from(index)] || s[4..] == [0, 0, 0, 0] {
                        return Err(invalid(
                            what,
                            format!(
                                "ip {v6}: not in node {}'s pod range {}",
                                p.node,
                                pod_cidr6(index)
                            ),
                        ));
                    }
                    if !used_v6.insert(*v6) {
                        return Err(invalid(what, format!("ip {v6} is used twice")));
                    }
                }
            }
        }
    }

    let mut uids: BTreeSet<String> = out.pods.iter().filter_map(|p| p.uid.clone()).collect();
    for p in &mut out.pods {
        let what = format!("pod {}/{}", p.namespace, p.name);
        let index = node_index(topology, &p.node)
            .ok_or_else(|| invalid(what.clone(), format!("node {:?} unknown", p.node)))?;
        if p.uid.is_none() {
            let uid = pod_uid(&p.namespace, &p.name);
            if !uids.insert(uid.clone()) {
                return Err(invalid(what, format!("generated uid {uid:?} is taken")));
            }
            p.uid = Some(uid);
        }
        let v4 = match p.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        }) {
            Some(v4) => v4,
            None => {
                let free = (FIRST_POD_HOST..=LAST_POD_HOST)
                    .map(|h| Ipv4Addr::new(10, 77, index, h))
                    .find(|ip| !used_v4.contains(ip))
                    .ok_or_else(|| {
                        invalid(
                            what.clone(),
                            format!("node {}'s pod range {} is full", p.node, pod_cidr(index)),
                        )
                    })?;
                used_v4.insert(free);
                p.ips.insert(0, IpAddr::V4(free));
                free
            }
        };
        if ipv6 && !p.ips.iter().any(IpAddr::is_ipv6) {
            let v6 = pod_ip6(index, u16::from(v4.octets()[3]));
            if !used_v6.insert(v6) {
                return Err(invalid(
                    what,
                    format!("ip {v6} (derived from {v4}) is already taken"),
                ));
            }
            p.ips.push(IpAddr::V6(v6));
        }
    }

    let mut vips = BTreeSet::new();
    for s in &out.services {
        if let Some(vip) = s.vip {
            let what = format!("service {}/{}", s.namespace, s.name);
            match vip {
                IpAddr::V4(v4) if in_service_range(v4) => {
                    if !vips.insert(v4) {
                        return Err(invalid(what, format!("vip {v4} is used twice")));
                    }
                }
                _ => {
                    return Err(invalid(
                        what,
                        format!("vip {vip}: not in the service range {SERVICE_V4}"),
                    ));
                }
            }
        }
    }
    // 10.77.240.1 ..= 10.77.255.254, skipping explicit VIPs.
    let base = u32::from(Ipv4Addr::new(10, 77, 240, 0));
    let mut cursor = 1u32;
    for s in &mut out.services {
        if s.vip.is_some() {
            continue;
        }
        let vip = loop {
            if cursor > SERVICE_HOSTS {
                return Err(invalid(
                    format!("service {}/{}", s.namespace, s.name),
                    format!("the service range {SERVICE_V4} is full"),
                ));
            }
            let candidate = Ipv4Addr::from(base + cursor);
            cursor += 1;
            if !vips.contains(&candidate) {
                break candidate;
            }
        };
        vips.insert(vip);
        s.vip = Some(IpAddr::V4(vip));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn demo_addresses() {
        let r = resolve(&Topology::demo(), true, "demo").unwrap();
        let by_name = |n: &str| r.pods.iter().find(|p| p.name == n).unwrap();
        // node-a is node 1, node-b node 2; pods count from .2 in file order.
        assert_eq!(
            by_name("client").ips,
            [ip("10.77.1.2"), ip("fd77:0:0:1::2")]
        );
        assert_eq!(by_name("web-2").ips, [ip("10.77.1.3"), ip("fd77:0:0:1::3")]);
        assert_eq!(by_name("web").ips, [ip("10.77.2.2"), ip("fd77:0:0:2::2")]);
        assert_eq!(by_name("iperf").ips, [ip("10.77.2.3"), ip("fd77:0:0:2::3")]);
        assert_eq!(r.services[0].vip, Some(ip("10.77.240.1")));
        assert!(
            r.pods
                .iter()
                .all(|p| p.uid.as_ref().is_some_and(|u| u.len() == 36))
        );
        assert_eq!(fabric_ip(2), "10.77.0.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(pod_cidr6(2), "fd77:0:0:2::/64");
        // Resolving is stable and idempotent.
        assert_eq!(resolve(&r, true, "again").unwrap(), r);
        let v4only = resolve(&Topology::demo(), false, "demo").unwrap();
        assert!(v4only.pods.iter().all(|p| p.ips.len() == 1));
    }

    #[test]
    fn automatic_addresses_go_around_explicit_ones() {
        let mut t = Topology::demo();
        t.pods[2].ips = vec![ip("10.77.1.2")]; // web-2 takes client's default
        t.services[0].vip = None;
        let mut extra = t.services[0].clone();
        extra.name = "web-b".into();
        extra.vip = Some(ip("10.77.240.1"));
        t.services.push(extra);
        let r = resolve(&t, false, "t").unwrap();
        assert_eq!(r.pods[0].ips, [ip("10.77.1.3")]);
        assert_eq!(r.pods[2].ips, [ip("10.77.1.2")]);
        assert_eq!(r.services[0].vip, Some(ip("10.77.240.2")));
        assert_eq!(r.services[1].vip, Some(ip("10.77.240.1")));
    }

    type Edit<'a> = &'a dyn Fn(&mut Topology);

    #[test]
    fn bad_addresses_are_named() {
        let cases: [(Edit, &str); 6] = [
            (&|t| t.pods[0].ips = vec![ip("10.77.2.9")], "10.77.2.9"),
            (&|t| t.pods[0].ips = vec![ip("10.77.1.1")], "10.77.1.1"),
            (&|t| t.pods[0].ips = vec![ip("192.168.1.5")], "192.168.1.5"),
            (
                &|t| {
                    t.pods[0].ips = vec![ip("10.77.1.7")];
                    t.pods[2].ips = vec![ip("10.77.1.7")];
                },
                "10.77.1.7 is used twice",
            ),
            (
                &|t| t.pods[0].ips = vec![ip("fd77:0:0:2::5")],
                "fd77:0:0:2::5",
            ),
            (&|t| t.services[0].vip = Some(ip("10.96.0.1")), "10.96.0.1"),
        ];
        for (edit, want) in cases {
            let mut t = Topology::demo();
            edit(&mut t);
            let err = resolve(&t, true, "mesh.yaml").unwrap_err().to_string();
            assert!(err.starts_with("topology mesh.yaml: "), "{err}");
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn a_full_node_is_an_error() {
        let mut t = Topology::demo();
        let template = t.pods[0].clone();
        t.pods = (0..254)
            .map(|i| {
                let mut p = template.clone();
                p.name = format!("p{i}");
                p
            })
            .collect();
        let err = resolve(&t, false, "big").unwrap_err().to_string();
        assert!(
            err.contains("pod default/p253") && err.contains("is full"),
            "{err}"
        );
        t.pods.pop();
        assert!(resolve(&t, false, "big").is_ok());
    }
}
