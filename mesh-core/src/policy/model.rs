//! The policy model: what a user writes, checked but not yet compiled.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// The API group and version a policy was written for. All three mean the
/// same thing here; the version is kept so a policy prints back as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApiVersion {
    /// `security.sockmesh.io/v1`, the CRD sockmesh installs.
    SockmeshV1,
    /// `security.istio.io/v1`.
    IstioV1,
    /// `security.istio.io/v1beta1`.
    IstioV1beta1,
}

impl ApiVersion {
    pub const ALL: [ApiVersion; 3] = [
        ApiVersion::SockmeshV1,
        ApiVersion::IstioV1,
        ApiVersion::IstioV1beta1,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::SockmeshV1 => "security.sockmesh.io/v1",
            ApiVersion::IstioV1 => "security.istio.io/v1",
            ApiVersion::IstioV1beta1 => "security.istio.io/v1beta1",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == value)
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `AuthorizationPolicy` document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub api_version: ApiVersion,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`: the namespace whose workloads the policy
    /// applies to (every namespace, if it is the root namespace).
    pub namespace: String,
    /// `spec.selector.matchLabels`. `None`: no selector. `None` and an empty
    /// map both select every workload in scope.
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.action`; ALLOW when not written.
    pub action: Action,
    /// `spec.rules`. Empty: the policy matches nothing.
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// A policy with no selector and no rules (for ALLOW: "allow nothing").
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, action: Action) -> Self {
        AuthorizationPolicy {
            api_version: ApiVersion::SockmeshV1,
            name: name.into(),
            namespace: namespace.into(),
            selector: None,
            action,
            rules: Vec::new(),
        }
    }
}

/// One entry of `spec.rules`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// The `source` of each `from` entry (`from: [{source: ...}]`). Empty:
    /// any source.
    pub from: Vec<SourceMatch>,
    /// The `operation` of each `to` entry (`to: [{operation: ...}]`). Empty:
    /// any destination port.
    pub to: Vec<Operation>,
}

/// `rules[].from[].source`: who the peer is. Every non-empty field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceMatch {
    /// As written (Istio form or `spiffe://` form, wildcards allowed).
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<IpBlock>,
    pub not_ip_blocks: Vec<IpBlock>,
}

impl SourceMatch {
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.ip_blocks.is_empty()
            && self.not_ip_blocks.is_empty()
    }
}

/// `rules[].to[].operation`: which destination port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

impl Operation {
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty() && self.not_ports.is_empty()
    }
}

/// An IP network: a CIDR, or a single address (a full-length prefix). Host
/// bits are cleared, as Envoy and ztunnel do (`10.1.2.3/8` is `10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlock(IpNet);

impl IpBlock {
    /// `None` if `prefix_len` is longer than the address.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let net = IpNet::new(addr, prefix_len).ok()?.trunc();
        // An IPv4-mapped block (`::ffff:10.0.0.0/104`) is the IPv4 block,
        // as peers' mapped addresses count as IPv4.
        if let IpNet::V6(v6) = net
            && let Some(v4) = v6.network().to_ipv4_mapped()
            && prefix_len >= 96
        {
            return Some(IpBlock(IpNet::V4(Ipv4Net::new(v4, prefix_len - 96).ok()?)));
        }
        Some(IpBlock(net))
    }

    /// Parses `1.2.3.4`, `1.2.3.0/24`, `2001:db8::1` or `2001:db8::/32`.
    pub fn parse(value: &str) -> Option<Self> {
        match value.split_once('/') {
            None => {
                let addr: IpAddr = value.parse().ok()?;
                let len = if addr.is_ipv4() { 32 } else { 128 };
                IpBlock::new(addr, len)
            }
            Some((addr, len)) => {
                // Plain decimal only: no sign, no spaces, no leading zeros.
                if len.is_empty()
                    || len.len() > 3
                    || !len.bytes().all(|b| b.is_ascii_digit())
                    || (len.len() > 1 && len.starts_with('0'))
                {
                    return None;
                }
                IpBlock::new(addr.parse().ok()?, len.parse().ok()?)
            }
        }
    }

    pub fn network(&self) -> IpAddr {
        self.0.network()
    }

    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// Whether `ip` lies in this network. An IPv4-mapped IPv6 address
    /// (`::ffff:10.0.0.1`, what a dual-stack socket reports) counts as the
    /// IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl fmt::Display for IpBlock {
    /// A full-length prefix prints as the bare address.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}
