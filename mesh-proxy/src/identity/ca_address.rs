//! The CA's address as `--ca` takes it. Only std and mesh-core: the fuzz
//! target `ca_address` compiles this file by path (see fuzz/Cargo.toml).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use mesh_core::display::{Shown, backslash_run, check_message};

/// Where the CA listens: `IP:PORT`, `[IPv6]:PORT`, or `HOST:PORT` with a
/// DNS name (e.g. the Service's `mesh-ca.sockmesh-system.svc:15012`),
/// resolved again at each connect, every address it resolves to tried in
/// turn. The TLS server name is separate (`--ca-server-name`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CaAddress {
    Ip(SocketAddr),
    Host { host: String, port: u16 },
}

/// A CA address that is neither `IP:PORT`, `[IPv6]:PORT` nor `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CA address {value}: {reason}")]
pub struct BadCaAddress {
    /// The value, quoted, escaped once and bounded.
    pub value: Shown,
    pub reason: String,
}

impl From<SocketAddr> for CaAddress {
    fn from(a: SocketAddr) -> Self {
        CaAddress::Ip(a)
    }
}

impl fmt::Display for CaAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaAddress::Ip(a) => a.fmt(f),
            CaAddress::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Longest DNS name (RFC 1035: 253 characters as text).
const MAX_DNS_NAME: usize = 253;

/// A DNS name: labels of letters, digits and `-` (not at either end), 1 to
/// 63 long, an optional final dot; the last label not all digits (that is
/// a mistyped IPv4 address, not a name).
fn dns_name_problem(host: &str) -> Option<String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Some("no host before the port".into());
    }
    if name.len() > MAX_DNS_NAME {
        return Some(format!("host name longer than {MAX_DNS_NAME} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Some("empty label in the host name (\"..\")".into());
        }
        if label.len() > 63 {
            return Some(format!(
                "host name label {} is longer than 63 characters",
                Shown::new(label)
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Some(format!(
                "{c:?} in the host name: not an IP address nor a DNS name (letters, digits, '-' and '.')"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!(
                "host name label {} starts or ends with '-'",
                Shown::new(label)
            ));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some("not an IPv4 address, and a DNS name cannot end in a numeric label".into());
    }
    None
}

impl std::str::FromStr for CaAddress {
    type Err = BadCaAddress;

    fn from_str(value: &str) -> Result<Self, BadCaAddress> {
        let bad = |reason: &str| BadCaAddress {
            value: Shown::new(value),
            reason: reason.to_owned(),
        };
        const FORMS: &str = "expected IP:PORT, [IPv6]:PORT or HOST:PORT";
        if value.is_empty() {
            return Err(bad(&format!("empty; {FORMS}")));
        }
        if value.contains("://") {
            return Err(bad(&format!("a URL; {FORMS}, without a scheme")));
        }
        let (host, port) = if let Some(rest) = value.strip_prefix('[') {
            let Some((inside, after)) = rest.split_once(']') else {
                return Err(bad("'[' without its ']'"));
            };
            let Some(port) = after.strip_prefix(':') else {
                return Err(bad(&format!("no :PORT after ']'; {FORMS}")));
            };
            let ip: Ipv6Addr = inside.parse().map_err(|_| {
                bad(&format!(
                    "{} between the brackets is not an IPv6 address",
                    Shown::new(inside)
                ))
            })?;
            (Some(IpAddr::V6(ip)), port)
        } else {
            let Some((host, port)) = value.rsplit_once(':') else {
                return Err(bad(&format!("no port; {FORMS}")));
            };
            if host.contains(':') {
                return Err(bad(
                    "an IPv6 address needs brackets around it: [ADDRESS]:PORT",
                ));
            }
            match host.parse::<std::net::Ipv4Addr>() {
                Ok(ip) => (Some(IpAddr::V4(ip)), port),
                Err(_) => {
                    if let Some(problem) = dns_name_problem(host) {
                        return Err(bad(&problem));
                    }
                    (None, port)
                }
            }
        };
        let port: u16 = match port.parse() {
            Ok(0) | Err(_) => {
                return Err(bad(&format!(
                    "port {} is not a number in 1..=65535",
                    Shown::new(port)
                )));
            }
            Ok(p) => p,
        };
        Ok(match host {
            Some(ip) => CaAddress::Ip(SocketAddr::new(ip, port)),
            None => {
                let host = value.rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
                CaAddress::Host {
                    host: host.to_ascii_lowercase(),
                    port,
                }
            }
        })
    }
}

/// Longest message a refusal can make: the value and one part of it shown
/// (each bounded), and the longest reason's text.
pub const MAX_ERROR_LEN: usize =
    2 * mesh_core::display::bounded_len(mesh_core::display::MAX_SHOWN_CHARS) + 200;

/// The fuzz target's body (`fuzz/fuzz_targets/ca_address.rs`), also run
/// over `fuzz/seeds/ca_address` by the unit tests: whatever is accepted
/// prints back to text that parses to the same address, with a port;
/// a refusal's message passes [`check_message`].
pub fn fuzz_ca_address(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match s.parse::<CaAddress>() {
        Ok(a) => {
            let port = match &a {
                CaAddress::Ip(sa) => sa.port(),
                CaAddress::Host { port, .. } => *port,
            };
            assert_ne!(port, 0, "accepted port 0 from {s:?}");
            assert_eq!(a.to_string().parse::<CaAddress>().as_ref(), Ok(&a), "{s:?}");
        }
        Err(e) => {
            if let Err(why) = check_message(&e.to_string(), MAX_ERROR_LEN, backslash_run(s)) {
                panic!("CA address {s:?}: {why}");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ca_addresses_parse_as_ip_bracketed_ipv6_or_dns_name() {
        let ok = |s: &str| s.parse::<CaAddress>().unwrap();
        assert_eq!(
            ok("10.96.0.12:15012"),
            CaAddress::Ip("10.96.0.12:15012".parse().unwrap())
        );
        assert_eq!(
            ok("[fd00::12]:15012"),
            CaAddress::Ip("[fd00::12]:15012".parse().unwrap())
        );
        assert_eq!(ok("[::1]:1"), CaAddress::Ip("[::1]:1".parse().unwrap()));
        assert_eq!(
            ok("mesh-ca.sockmesh-system.svc:15012"),
            CaAddress::Host {
                host: "mesh-ca.sockmesh-system.svc".into(),
                port: 15012
            }
        );
        assert_eq!(
            ok("Mesh-CA.cluster.local.:443"),
            CaAddress::Host {
                host: "mesh-ca.cluster.local.".into(),
                port: 443
            }
        );
        assert_eq!(ok("localhost:15012").to_string(), "localhost:15012");
        assert_eq!(ok("[fd00::12]:15012").to_string(), "[fd00::12]:15012");
        assert_eq!(
            serde_json::to_string(&ok("mesh-ca.ns.svc:15012")).unwrap(),
            "\"mesh-ca.ns.svc:15012\""
        );
        assert_eq!(
            CaAddress::from("127.0.0.1:9".parse::<SocketAddr>().unwrap()),
            ok("127.0.0.1:9")
        );
    }

    #[test]
    fn bad_ca_addresses_are_refused_naming_the_value() {
        for (value, why) in [
            ("", "empty"),
            ("mesh-ca", "no port"),
            ("10.96.0.12", "no port"),
            ("fd00::12:15012", "needs brackets"),
            ("fd00::12", "needs brackets"),
            ("[fd00::12]", "no :PORT after ']'"),
            ("[fd00::12:15012", "without its ']'"),
            ("[10.0.0.1]:15012", "is not an IPv6 address"),
            ("[fd00::zz]:1", "is not an IPv6 address"),
            ("mesh-ca:0", "not a number in 1..=65535"),
            ("mesh-ca:65536", "not a number in 1..=65535"),
            ("mesh-ca:http", "not a number in 1..=65535"),
            ("mesh-ca:", "not a number in 1..=65535"),
            (":15012", "no host before the port"),
            ("10.96.0.300:15012", "numeric label"),
            ("mesh_ca.svc:15012", "'_' in the host name"),
            ("mesh ca:15012", "' ' in the host name"),
            ("mesh-ca..svc:15012", "empty label"),
            ("-mesh.svc:15012", "starts or ends with '-'"),
            ("http://mesh-ca:15012", "a URL"),
            ("mesh-ca/v1:15012", "'/' in the host name"),
            ("mesh-ca:15012\n", "not a number"),
        ] {
            let e = value.parse::<CaAddress>().unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("CA address {value:?}: ")),
                "{value:?}: {e}"
            );
            assert!(e.contains(why), "{value:?}: {e} lacks {why:?}");
        }
        let long = format!("{}.svc:1", "a".repeat(64));
        assert!(
            long.parse::<CaAddress>()
                .unwrap_err()
                .to_string()
                .contains("longer than 63")
        );
        let longer = format!("{}:1", ["abcdefgh"; 30].join("."));
        assert!(
            longer
                .parse::<CaAddress>()
                .unwrap_err()
                .to_string()
                .contains("longer than 253")
        );
    }

    #[test]
    fn fuzz_seeds() {
        for seed in mesh_core::display::fuzz_seeds("ca_address") {
            fuzz_ca_address(&seed);
        }
        let huge = format!("{}\n:1", "x".repeat(100_000));
        fuzz_ca_address(huge.as_bytes());
        fuzz_ca_address(b"[\\\\]:1");
        // Found by the fuzzer: a long non-address between the brackets
        // was shown whole.
        let long_inside = format!("[{}]:1", "\u{13}".repeat(2000));
        fuzz_ca_address(long_inside.as_bytes());
        let long_label = format!("{}.svc:1", "\u{13}".repeat(2000));
        fuzz_ca_address(long_label.as_bytes());
    }
}
