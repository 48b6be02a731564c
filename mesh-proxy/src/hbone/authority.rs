//! The `CONNECT` target of an HBONE stream.
//!
//! It arrives from an untrusted peer, so the grammar is the narrowest that
//! interoperates with ztunnel: `a.b.c.d:port` or `[v6]:port`, the address
//! in the form the standard library parses (no leading zeros in IPv4
//! octets), the port decimal without sign or leading zero in `1..=65535`.
//! No host names (nothing is resolved), no userinfo, no zone ids, no
//! IPv4-mapped IPv6 addresses (they would let a peer name an IPv4
//! destination in a form that IPv4 policy does not match), no unspecified
//! address (`0.0.0.0` and `::` mean "this host"). Whether the address is one
//! of this node's workloads is the caller's check, not the parser's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_core::display::{MAX_SHOWN_CHARS, Shown, backslash_run, bounded_len, check_message};

/// Longest authority accepted: `[` + 45 (longest IPv6 text) + `]:65535` is 53.
pub const MAX_AUTHORITY_LEN: usize = 64;

/// Longest message an [`AuthorityError`] prints: the longest fixed text and
/// the authority once, shown through [`Shown`].
pub const MAX_ERROR_LEN: usize = 96 + bounded_len(MAX_SHOWN_CHARS);

/// Why an authority was refused. Each variant carries the value once, as
/// the message shows it: quoted, escaped once (a hostile value cannot forge
/// log lines), cut to [`MAX_SHOWN_CHARS`] characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("authority is empty")]
    Empty,
    /// The value and its length in bytes.
    #[error("authority {0}: longer than {MAX_AUTHORITY_LEN} bytes")]
    TooLong(Shown, usize),
    #[error("authority {0} carries userinfo (`@`); only ip:port is allowed")]
    UserInfo(Shown),
    #[error("authority {0} has no port")]
    MissingPort(Shown),
    #[error("authority {0}: the port is not a decimal number in 1..=65535")]
    BadPort(Shown),
    #[error("authority {0}: port 0 is not a destination")]
    PortZero(Shown),
    #[error("authority {0}: IPv6 zone ids are not allowed")]
    Zone(Shown),
    #[error("authority {0}: an IPv6 address must be in brackets")]
    UnbracketedIpv6(Shown),
    #[error("authority {0}: the host is not an IP address (host names are not allowed)")]
    NotAnIp(Shown),
    #[error("authority {0}: IPv4-mapped IPv6 addresses are not allowed; use the IPv4 form")]
    Ipv4Mapped(Shown),
    #[error("authority {0}: the unspecified address is not a destination")]
    Unspecified(Shown),
}

/// Parses the `:authority` of an HBONE `CONNECT` into the destination.
pub fn parse_authority(s: &str) -> Result<SocketAddr, AuthorityError> {
    if s.is_empty() {
        return Err(AuthorityError::Empty);
    }
    let shown = || Shown::new(s);
    if s.len() > MAX_AUTHORITY_LEN {
        return Err(AuthorityError::TooLong(shown(), s.len()));
    }
    if s.contains('@') {
        return Err(AuthorityError::UserInfo(shown()));
    }
    if s.contains('%') {
        return Err(AuthorityError::Zone(shown()));
    }
    let (ip, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(AuthorityError::NotAnIp(shown()));
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err(AuthorityError::MissingPort(shown()));
        };
        let ip: Ipv6Addr = host.parse().map_err(|_| AuthorityError::NotAnIp(shown()))?;
        if ip.to_ipv4_mapped().is_some() {
            return Err(AuthorityError::Ipv4Mapped(shown()));
        }
        (IpAddr::V6(ip), port)
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(AuthorityError::MissingPort(shown()));
        };
        if host.contains(':') {
            return Err(AuthorityError::UnbracketedIpv6(shown()));
        }
        let ip: Ipv4Addr = host.parse().map_err(|_| AuthorityError::NotAnIp(shown()))?;
        (IpAddr::V4(ip), port)
    };
    let port = parse_port(port).ok_or_else(|| AuthorityError::BadPort(shown()))?;
    if port == 0 {
        return Err(AuthorityError::PortZero(shown()));
    }
    if ip.is_unspecified() {
        return Err(AuthorityError::Unspecified(shown()));
    }
    Ok(SocketAddr::new(ip, port))
}

/// Decimal digits only (`u16::from_str` would take a `+`), no leading zero
/// except for "0" itself.
fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if p.len() > 1 && p.starts_with('0') {
        return None;
    }
    p.parse().ok()
}

/// The fuzz target's body (`fuzz/fuzz_targets/hbone_authority.rs`), also
/// run over seeds by the unit tests. Panics only if an invariant breaks:
/// whatever is accepted has a port, a specified address, and prints back to
/// text that parses to the same address; a refusal's message passes
/// [`check_message`] (at most [`MAX_ERROR_LEN`] bytes, escaped once).
pub fn fuzz_authority(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match parse_authority(s) {
        Ok(addr) => {
            assert_ne!(addr.port(), 0, "accepted port 0 from {s:?}");
            assert!(!addr.ip().is_unspecified(), "accepted {s:?}");
            assert!(s.len() <= MAX_AUTHORITY_LEN);
            // IPv6 may arrive non-canonical ("[0::1]:80"); its canonical
            // text must parse back to the same address.
            assert_eq!(parse_authority(&addr.to_string()), Ok(addr));
        }
        Err(e) => {
            if let Err(why) = check_message(&e.to_string(), MAX_ERROR_LEN, backslash_run(s)) {
                panic!("authority {s:?}: {why}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{SocketAddrV4, SocketAddrV6};

    #[test]
    fn accepts_ipv4_and_bracketed_ipv6() {
        assert_eq!(
            parse_authority("10.0.0.7:8080"),
            Ok("10.0.0.7:8080".parse().unwrap_or_else(|_| unreachable!()))
        );
        let v6: SocketAddr = "[fd00::1]:443".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(parse_authority("[fd00::1]:443"), Ok(v6));
        assert!(parse_authority("[::1]:80").is_ok());
        assert!(parse_authority("127.0.0.1:65535").is_ok());
    }

    fn err(s: &str) -> AuthorityError {
        match parse_authority(s) {
            Ok(a) => panic!("{s:?} was accepted as {a}"),
            Err(e) => e,
        }
    }

    #[test]
    fn refuses_bad_authorities_naming_the_value() {
        use AuthorityError as E;
        assert_eq!(err(""), E::Empty);
        assert!(matches!(err("example.com:80"), E::NotAnIp(..)));
        assert!(matches!(err("localhost:80"), E::NotAnIp(..)));
        assert!(matches!(err("user@10.0.0.1:80"), E::UserInfo(..)));
        assert!(matches!(err("10.0.0.1:0"), E::PortZero(..)));
        assert!(matches!(err("10.0.0.1"), E::MissingPort(..)));
        assert!(matches!(err("10.0.0.1:"), E::BadPort(..)));
        assert!(matches!(err("10.0.0.1:+80"), E::BadPort(..)));
        assert!(matches!(err("10.0.0.1:080"), E::BadPort(..)));
        assert!(matches!(err("10.0.0.1:65536"), E::BadPort(..)));
        assert!(matches!(err("10.0.0.1:123456"), E::BadPort(..)));
        assert!(matches!(err("010.0.0.1:80"), E::NotAnIp(..)));
        assert!(matches!(err("10.0.0:80"), E::NotAnIp(..)));
        assert!(matches!(err("[fe80::1%eth0]:80"), E::Zone(..)));
        assert!(matches!(err("[fe80::1%25eth0]:80"), E::Zone(..)));
        assert!(matches!(err("::1:80"), E::UnbracketedIpv6(..)));
        assert!(matches!(err("[::1]"), E::MissingPort(..)));
        assert!(matches!(err("[::1]80"), E::MissingPort(..)));
        assert!(matches!(err("[::1:80"), E::NotAnIp(..)));
        assert!(matches!(err("[10.0.0.1]:80"), E::NotAnIp(..)));
        assert!(matches!(err("[::ffff:10.0.0.1]:80"), E::Ipv4Mapped(..)));
        assert!(matches!(err("0.0.0.0:80"), E::Unspecified(..)));
        assert!(matches!(err("[::]:80"), E::Unspecified(..)));
        assert!(matches!(err(" 10.0.0.1:80"), E::NotAnIp(..)));
        assert!(matches!(err("10.0.0.1:80 "), E::BadPort(..)));
        let long = format!("{}:80", "1".repeat(200));
        assert!(matches!(err(&long), E::TooLong(_, 203)));
        assert_eq!(
            err(&long).to_string(),
            format!(
                "authority \"{}… (203 bytes)\": longer than 64 bytes",
                "1".repeat(64)
            )
        );

        // The value is named, escaped.
        let msg = err("evil\nhost:80").to_string();
        assert!(msg.contains(r#""evil\nhost:80""#), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let msg = err("10.0.0.1:0").to_string();
        assert!(msg.contains("\"10.0.0.1:0\""), "{msg}");
    }

    /// The fuzzer's first finding: `[` and 63 control characters were shown
    /// twice (the authority and its host), escaped, over the bound.
    #[test]
    fn hostile_authorities_are_shown_once_escaped_once_and_bounded() {
        let ctrl =
            |n: usize| -> String { (0..n).map(|i| char::from(1 + (i % 31) as u8)).collect() };
        let cases = [
            format!("[{}", ctrl(63)),
            format!("[{}]:80", ctrl(59)),
            format!("{}:80", ctrl(61)),
            format!("10.0.0.1:{}", ctrl(55)),
            ctrl(64),
            ctrl(10 * 1024),
            format!("[{}", ctrl(10 * 1024)),
            "\\".repeat(64),
        ];
        for input in cases {
            let msg = err(&input).to_string();
            assert!(msg.len() <= MAX_ERROR_LEN, "{} bytes: {msg}", msg.len());
            assert_eq!(msg.matches("authority \"").count(), 1, "{msg}");
            assert_eq!(msg.matches('"').count(), 2, "shown once: {msg}");
            assert_eq!(
                check_message(&msg, MAX_ERROR_LEN, backslash_run(&input)),
                Ok(())
            );
            if !input.contains('\\') {
                assert!(!msg.contains("\\\\"), "escaped twice: {msg}");
            }
            fuzz_authority(input.as_bytes());
        }
    }

    #[test]
    fn fuzz_seeds() {
        for seed in mesh_core::display::fuzz_seeds("hbone_authority") {
            fuzz_authority(&seed);
        }
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1..=u16::MAX)
                .prop_map(|(ip, p)| SocketAddr::V4(SocketAddrV4::new(ip.into(), p))),
            (any::<[u8; 16]>(), 1..=u16::MAX)
                .prop_map(|(ip, p)| SocketAddr::V6(SocketAddrV6::new(ip.into(), p, 0, 0))),
        ]
    }

    proptest! {
        #[test]
        fn any_socket_addr_round_trips(addr in arb_addr()) {
            let text = addr.to_string();
            let mapped = matches!(addr.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
            if addr.ip().is_unspecified() || mapped {
                prop_assert!(parse_authority(&text).is_err());
            } else {
                prop_assert_eq!(parse_authority(&text), Ok(addr));
            }
        }

        #[test]
        fn random_strings_never_panic(s in "\\PC{0,80}") {
            fuzz_authority(s.as_bytes());
        }

        #[test]
        fn authority_like_strings_never_panic(s in "[\\[\\]0-9a-f:.%@+]{0,70}") {
            fuzz_authority(s.as_bytes());
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            fuzz_authority(&b);
        }
    }
}
