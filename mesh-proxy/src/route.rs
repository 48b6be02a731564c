//! Where an outbound connection goes: pure functions from a registry
//! snapshot and an original destination to a [`Route`] (no I/O, no lock).

use std::net::SocketAddr;

use mesh_core::registry::{IndexedSnapshot, Pod};
use mesh_ebpf::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

/// The proxy's own in-pod ports: never a target it dials for a peer (the
/// proxy would connect to itself, and again, until out of descriptors).
pub fn is_proxy_port(port: u16) -> bool {
    [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&port)
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) written as
/// the IPv4 address it is, so routing and policy see one address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To a meshed pod, through its node proxy: HBONE to `pod_ip:15008`
    /// with `:authority` = `target`.
    Mesh {
        dst: Box<Pod>,
        target: SocketAddr,
        service: Option<String>,
    },
    /// Not a mesh destination: plain TCP from the pod to `target`.
    Passthrough { target: SocketAddr },
    /// A Service with no endpoint or no such port.
    Unroutable { reason: String },
}

/// Picks the route for `orig`. `rr` spreads Service connections over their
/// endpoints.
pub fn route(snapshot: &IndexedSnapshot, orig: SocketAddr, rr: usize) -> Route {
    let orig = canonical(orig);
    if let Some(svc) = snapshot.service_by_vip(orig.ip()) {
        let name = format!("{}.{}.svc", svc.name, svc.namespace);
        let Some(port) = svc.target_port(orig.port()) else {
            return Route::Unroutable {
                reason: format!(
                    "service {}/{} has no port {}",
                    svc.namespace,
                    svc.name,
                    orig.port()
                ),
            };
        };
        let eps: Vec<&Pod> = snapshot
            .endpoints(svc)
            .filter(|p| !p.ips.is_empty())
            .collect();
        if eps.is_empty() {
            return Route::Unroutable {
                reason: format!("service {}/{} has no endpoints", svc.namespace, svc.name),
            };
        }
        let pod = eps[rr % eps.len()];
        let ip = pod
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == orig.is_ipv4())
            .unwrap_or(&pod.ips[0]);
        if !pod.meshed() {
            return Route::Passthrough {
                target: SocketAddr::new(*ip, port),
            };
        }
        return Route::Mesh {
            dst: Box::new(pod.clone()),
            target: SocketAddr::new(*ip, port),
            service: Some(name),
        };
    }
    match snapshot.pod_by_ip(orig.ip()).filter(|p| p.meshed()) {
        Some(pod) => Route::Mesh {
            dst: Box::new(pod.clone()),
            target: orig,
            service: None,
        },
        None => Route::Passthrough { target: orig },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;

    const REGISTRY: &str = "
nodes: [{name: n1}]
pods:
  - {namespace: default, name: web-1, uid: u1, node: n1, ips: [10.0.0.1], labels: {app: web}}
  - {namespace: default, name: web-2, uid: u2, node: n1, ips: [10.0.0.2, 'fd00::2'], labels: {app: web}}
  - {namespace: default, name: out, uid: u3, node: n1, ips: [10.0.0.3], labels: {app: out, sockmesh.io/mesh: disabled}}
services:
  - {namespace: default, name: web, vip: 10.96.0.1, ports: [{port: 80, target_port: 8080}], selector: {app: web}}
  - {namespace: default, name: empty, vip: 10.96.0.2, ports: [{port: 80}], selector: {app: none}}
  - {namespace: default, name: out, vip: 10.96.0.3, ports: [{port: 80}], selector: {app: out}}
";

    fn snap() -> IndexedSnapshot {
        mesh_core::registry::Snapshot::parse(Path::new("r.yaml"), REGISTRY)
            .unwrap()
            .into()
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_service_vip_goes_round_robin_to_its_endpoints_target_port() {
        let s = snap();
        let picked: Vec<_> = (0..3)
            .map(|rr| match route(&s, at("10.96.0.1:80"), rr) {
                Route::Mesh {
                    dst,
                    target,
                    service,
                } => {
                    assert_eq!(service.as_deref(), Some("web.default.svc"));
                    (dst.name, target)
                }
                r => panic!("{r:?}"),
            })
            .collect();
        assert_eq!(
            picked,
            [
                ("web-1".to_owned(), at("10.0.0.1:8080")),
                ("web-2".to_owned(), at("10.0.0.2:8080")),
                ("web-1".to_owned(), at("10.0.0.1:8080")),
            ]
        );
    }

    #[test]
    fn a_pod_address_is_meshed_unless_the_pod_opted_out() {
        let s = snap();
        assert!(matches!(route(&s, at("[fd00::2]:9000"), 0),
            Route::Mesh { dst, target, service: None } if dst.name == "web-2" && target == at("[fd00::2]:9000")));
        // An IPv4-mapped address is the IPv4 pod, not a way around mTLS.
        assert!(matches!(route(&s, at("[::ffff:10.0.0.1]:80"), 0),
            Route::Mesh { target, .. } if target == at("10.0.0.1:80")));
        assert_eq!(
            route(&s, at("10.0.0.3:80"), 0),
            Route::Passthrough {
                target: at("10.0.0.3:80")
            }
        );
        assert_eq!(
            route(&s, at("10.96.0.3:80"), 0),
            Route::Passthrough {
                target: at("10.0.0.3:80")
            }
        );
        assert_eq!(
            route(&s, at("192.0.2.1:443"), 0),
            Route::Passthrough {
                target: at("192.0.2.1:443")
            }
        );
    }

    #[test]
    fn a_service_without_the_port_or_endpoints_is_unroutable() {
        let s = snap();
        for (dst, why) in [
            ("10.96.0.1:81", "service default/web has no port 81"),
            ("10.96.0.2:80", "service default/empty has no endpoints"),
        ] {
            assert_eq!(
                route(&s, at(dst), 0),
                Route::Unroutable { reason: why.into() }
            );
        }
    }

    #[test]
    fn the_proxys_own_ports_are_known() {
        assert!([15001, 15006, 15008].into_iter().all(is_proxy_port));
        assert!(!is_proxy_port(15000) && !is_proxy_port(8080));
    }
}
