//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The parser accepts exactly the SPIFFE ID shape sockmesh issues and nothing
//! looser: lowercase scheme and trust domain, no port, user info, query or
//! fragment, exactly the two `ns`/`sa` path pairs, Kubernetes names in them.
//! Parsing then printing gives back the input byte for byte.
//!
//! The [`Clock`] the certificate code judges validity with also lives here,
//! so tests can move time for the CA and its clients alike.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::display::{MAX_SHOWN_CHARS, Shown, backslash_run, bounded_len, check_message};

/// Longest SPIFFE ID the SPIFFE spec allows (bytes).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain the SPIFFE spec allows (bytes).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Longest message an [`IdentityError`] prints: the longest fixed text
/// and one value shown through [`Shown`].
pub const MAX_ERROR_LEN: usize = 128 + bounded_len(MAX_SHOWN_CHARS);

/// Why a SPIFFE ID or one of its parts was refused. Each variant carries the
/// offending value, as shown in the message: quoted, escaped once, cut to
/// [`MAX_SHOWN_CHARS`] characters (a SPIFFE ID comes from peers and sign
/// requests).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("SPIFFE ID {value}: longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong { value: Shown },
    #[error("SPIFFE ID {value}: does not start with \"spiffe://\"")]
    Scheme { value: Shown },
    #[error("trust domain {value}: {reason}")]
    TrustDomain { value: Shown, reason: &'static str },
    #[error("SPIFFE ID {value}: path must be /ns/<namespace>/sa/<service-account>")]
    Path { value: Shown },
    #[error("namespace {value}: {reason}")]
    Namespace { value: Shown, reason: &'static str },
    #[error("service account {value}: {reason}")]
    ServiceAccount { value: Shown, reason: &'static str },
}

/// A workload identity. Always valid: it can only be made through
/// [`Identity::new`] or [`Identity::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    /// Builds an identity from its parts, checking each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_namespace(namespace)?;
        validate_service_account(service_account)?;
        let id = Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let len = id.to_string().len();
        if len > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong {
                value: Shown::new(&id.to_string()),
            });
        }
        Ok(id)
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn parse(value: &str) -> Result<Self, IdentityError> {
        if value.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong {
                value: Shown::new(value),
            });
        }
        let rest = value
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme {
                value: Shown::new(value),
            })?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        let path_err = || IdentityError::Path {
            value: Shown::new(value),
        };
        // path is "/ns/<ns>/sa/<sa>": split gives ["", "ns", ns, "sa", sa].
        let mut parts = path.split('/');
        let (Some(""), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(path_err());
        };
        validate_namespace(ns)?;
        validate_service_account(sa)?;
        Ok(Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The SPIFFE ID as a URI string (same as `to_string()`).
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse(s)
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Identity::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A trust domain: lowercase letters, digits, `.`, `-`, `_` (the SPIFFE
/// spec's set), at most 255 bytes.
pub fn validate_trust_domain(value: &str) -> Result<(), IdentityError> {
    let err = |reason| {
        Err(IdentityError::TrustDomain {
            value: Shown::new(value),
            reason,
        })
    };
    if value.is_empty() {
        return err("empty");
    }
    if value.len() > MAX_TRUST_DOMAIN_LEN {
        return err("longer than 255 bytes");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return err("only lowercase letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

/// A Kubernetes DNS-1123 label: 1–63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn dns1123_label(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("empty");
    }
    if value.len() > 63 {
        return Err("longer than 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lowercase letters, digits and '-' are allowed");
    }
    let ends_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !ends_ok(value.bytes().next()) || !ends_ok(value.bytes().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// A Kubernetes DNS-1123 subdomain: labels joined by `.`, at most 253 bytes.
pub fn dns1123_subdomain(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("empty");
    }
    if value.len() > 253 {
        return Err("longer than 253 characters");
    }
    value.split('.').try_for_each(dns1123_label)
}

/// Namespaces are DNS-1123 labels.
pub fn validate_namespace(value: &str) -> Result<(), IdentityError> {
    dns1123_label(value).map_err(|reason| IdentityError::Namespace {
        value: Shown::new(value),
        reason,
    })
}

/// Service accounts are DNS-1123 subdomains.
pub fn validate_service_account(value: &str) -> Result<(), IdentityError> {
    dns1123_subdomain(value).map_err(|reason| IdentityError::ServiceAccount {
        value: Shown::new(value),
        reason,
    })
}

/// Fuzz entry point for the SPIFFE ID parser (called by `fuzz/` and by unit
/// tests over seeds). Panics only on a broken invariant: an accepted ID must
/// print back to its input and parse again to the same value; a refusal's
/// message must pass [`check_message`] (bounded, the value escaped once).
pub fn fuzz_parse(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match Identity::parse(s) {
        Ok(id) => {
            let printed = id.to_string();
            assert_eq!(printed, s, "accepted SPIFFE ID does not print back");
            assert_eq!(
                Identity::parse(&printed).ok(),
                Some(id.clone()),
                "printed SPIFFE ID does not parse back"
            );
            assert_eq!(
                Identity::new(id.trust_domain(), id.namespace(), id.service_account()).ok(),
                Some(id),
                "parts of an accepted SPIFFE ID are refused by Identity::new"
            );
        }
        Err(e) => {
            if let Err(why) = check_message(&e.to_string(), MAX_ERROR_LEN, backslash_run(s)) {
                panic!("SPIFFE ID {s:?}: {why}");
            }
        }
    }
}

/// Wall-clock time as the certificate code sees it. Production uses
/// [`SystemClock`]; tests use [`ManualClock`] and move time by hand.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The machine's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to. Cloning shares the same time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        ManualClock(Arc::new(Mutex::new(start)))
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }

    pub fn set(&self, to: SystemTime) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_back() {
        let s = "spiffe://cluster.local/ns/default/sa/web";
        let id = Identity::parse(s).unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), s);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), id);
    }

    #[test]
    fn refuses_with_the_value_named() {
        let cases = [
            ("", "does not start"),
            ("http://td/ns/a/sa/b", "does not start"),
            ("SPIFFE://td/ns/a/sa/b", "does not start"),
            ("spiffe://TD/ns/a/sa/b", "trust domain \"TD\""),
            ("spiffe://td:80/ns/a/sa/b", "trust domain \"td:80\""),
            ("spiffe://u@td/ns/a/sa/b", "trust domain \"u@td\""),
            ("spiffe:///ns/a/sa/b", "trust domain \"\""),
            ("spiffe://td", "path must be"),
            ("spiffe://td/", "path must be"),
            ("spiffe://td/ns/a/sa/b/", "path must be"),
            ("spiffe://td/ns/a/sa/b/c", "path must be"),
            ("spiffe://td/ns/a/sa/b?x=1", "service account \"b?x=1\""),
            ("spiffe://td/ns/a/sa/b#f", "service account \"b#f\""),
            ("spiffe://td/sa/b/ns/a", "path must be"),
            ("spiffe://td/ns//sa/b", "namespace \"\""),
            ("spiffe://td/ns/-a/sa/b", "namespace \"-a\""),
            ("spiffe://td/ns/A/sa/b", "namespace \"A\""),
            ("spiffe://td/ns/a.b/sa/b", "namespace \"a.b\""),
            ("spiffe://td/ns/a/sa/..", "service account \"..\""),
            ("spiffe://td/ns/a/sa/b%41", "service account \"b%41\""),
        ];
        for (input, want) in cases {
            let err = Identity::parse(input).expect_err(input).to_string();
            assert!(err.contains(want), "{input:?}: {err:?} lacks {want:?}");
        }
        assert!(Identity::parse("spiffe://td/ns/a/sa/b.c-d").is_ok());
        let long = format!("spiffe://td/ns/a/sa/{}", "a".repeat(3000));
        assert!(matches!(
            Identity::parse(&long),
            Err(IdentityError::TooLong { .. })
        ));
    }

    #[test]
    fn hostile_values_are_shown_once_escaped_once_and_bounded() {
        let junk: String = (0..10 * 1024)
            .map(|i| char::from(1 + (i % 31) as u8))
            .collect();
        let cases = [
            (junk.clone(), "SPIFFE ID \"\\u{1}\\u{2}"),
            (format!("spiffe://{junk}"), "SPIFFE ID \"spiffe://\\u{1}"),
            (junk[..1000].to_owned(), "SPIFFE ID \"\\u{1}"),
            (
                format!("spiffe://{}", &junk[..1000]),
                "trust domain \"\\u{1}",
            ),
            (
                format!("spiffe://td/ns/{}/sa/b", &junk[..1000]),
                "namespace \"\\u{1}",
            ),
            (
                format!("spiffe://td/ns/a/sa/{}", &junk[..1000]),
                "service account \"\\u{1}",
            ),
            (
                format!("spiffe://td/{}", &junk[..1000]),
                "SPIFFE ID \"spiffe://td/\\u{1}",
            ),
        ];
        for (input, start) in cases {
            let msg = Identity::parse(&input).unwrap_err().to_string();
            assert!(msg.starts_with(start), "{msg}");
            assert!(msg.len() <= MAX_ERROR_LEN, "{} bytes: {msg}", msg.len());
            assert!(msg.contains(" bytes)\": "), "cut, with its size: {msg}");
            assert!(!msg.contains("\\\\"), "escaped twice: {msg}");
            assert_eq!(check_message(&msg, MAX_ERROR_LEN, 0), Ok(()));
        }
    }

    #[test]
    fn fuzz_seeds() {
        for seed in crate::display::fuzz_seeds("spiffe_id") {
            fuzz_parse(&seed);
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = ManualClock::new(start);
        let other = clock.clone();
        assert_eq!(clock.now(), start);
        other.advance(Duration::from_secs(5));
        assert_eq!(clock.now(), start + Duration::from_secs(5));
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(
            td in "[a-z0-9._-]{1,40}",
            ns in label(),
            sa in prop::collection::vec(label(), 1..4).prop_map(|v| v.join(".")),
        ) {
            let id = Identity::new(&td, &ns, &sa).unwrap();
            let s = id.to_string();
            prop_assert_eq!(Identity::parse(&s).unwrap(), id);
        }

        #[test]
        fn arbitrary_strings_never_panic_and_accepted_ones_are_canonical(s in ".{0,80}") {
            fuzz_parse(s.as_bytes());
        }

        #[test]
        fn near_misses_are_refused(
            ns in label(),
            sa in label(),
            junk in "[A-Z/?#:@% ]",
            at in 0usize..4,
        ) {
            let mut parts = ["td".to_string(), ns, sa, String::new()];
            parts[at].push_str(&junk);
            let s = format!("spiffe://{}/ns/{}/sa/{}{}", parts[0], parts[1], parts[2], parts[3]);
            prop_assert!(Identity::parse(&s).is_err(), "accepted {}", s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..120)) {
            fuzz_parse(&data);
        }
    }
}
