//! The CNI plugin ↔ node agent enrollment protocol (version 1).
//!
//! `mesh-cni` runs once per CNI command, as root, in the container
//! runtime's context; the node proxy serves a Unix socket. One connection
//! carries one exchange: the plugin sends a [`Request`] frame, the proxy
//! answers one [`Response`] frame and closes.
//!
//! A frame is a 4-byte big-endian length, then that many bytes of JSON
//! (at most [`MAX_MESSAGE`]). Both ends parse strictly: unknown fields, a
//! version other than [`VERSION`], names that are not Kubernetes names, a
//! netns path that is not absolute, more than [`MAX_IPS`] addresses: each
//! is refused with an error that names the field and its value (quoted,
//! escaped and bounded by [`crate::display`]).
//!
//! ```text
//! plugin ── {"version":1,"op":"add","pod":{...}} ──▶ proxy
//!        ◀── {"version":1,"result":"captured","netns_cookie":4711} ──
//! ```

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::display::{Shown, text};

/// The protocol version this code speaks.
pub const VERSION: u32 = 1;
/// Largest frame body either side accepts (bytes of JSON).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most addresses one pod attachment may carry.
pub const MAX_IPS: usize = 16;
/// Most attachments a GC request may list as still valid.
pub const MAX_VALID: usize = 512;
/// Longest netns path (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Longest container ID, pod UID, interface name or reason.
pub const MAX_ID: usize = 256;
pub const MAX_REASON: usize = 1024;
/// Bytes of a library message an error shows.
const SHOWN_TEXT: usize = 200;
/// Longest error message a parse can give (the fuzz target asserts it).
pub const MAX_ERROR_LEN: usize = 600;

/// One pod's network attachment as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodAttachment {
    /// CNI_CONTAINERID: the sandbox this attachment belongs to.
    pub container_id: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_NETNS: the pod's network namespace (a path the proxy opens).
    pub netns: PathBuf,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's addresses from the primary plugin's result.
    pub ips: Vec<IpAddr>,
}

impl PodAttachment {
    /// `namespace/name`, the key the proxy files pods under.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// An attachment the runtime still holds (GC keeps what it lists).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRef {
    pub container_id: String,
    pub ifname: String,
}

/// A pod by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodName {
    pub namespace: String,
    pub name: String,
}

impl PodName {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Op {
    /// Capture this pod; answer once it is captured (or why not).
    Add { pod: PodAttachment },
    /// Is this pod still captured as attached?
    Check { pod: PodAttachment },
    /// The runtime released this attachment (idempotent). `pod`, when the
    /// runtime named it, also releases what the agent found of that pod by
    /// itself (a restarted agent knows running pods only by their process).
    Del {
        attachment: AttachmentRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<PodName>,
    },
    /// Release every attachment not in `valid`.
    Gc { valid: Vec<AttachmentRef> },
    /// Is the agent there and ready?
    Status {},
}

/// A request frame: `version` next to the operation's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub op: Op,
}

impl Request {
    pub fn new(op: Op) -> Self {
        Request {
            version: VERSION,
            op,
        }
    }
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// The pod's netns is enrolled and its listeners are open: its first
    /// connect is meshed.
    Captured { netns_cookie: u64 },
    /// The pod is not opted in: nothing to do, the plugin succeeds at once.
    NotMeshed { reason: String },
    /// The agent could not capture the pod (now): the plugin fails, so the
    /// runtime retries (fail closed).
    Refused { reason: String },
    /// DEL, GC, STATUS done.
    Done {},
}

/// A response frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Response {
    pub version: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Response {
    pub fn new(outcome: Outcome) -> Self {
        Response {
            version: VERSION,
            outcome,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enrollment message of {len} bytes: more than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("enrollment message is empty")]
    Empty,
    #[error("enrollment message is not valid JSON of protocol v{VERSION}: {0}")]
    Json(String),
    #[error(
        "enrollment protocol version {got}: this side speaks version {VERSION} only (upgrade the older of mesh-cni and mesh-proxy)"
    )]
    Version { got: u32 },
    #[error("enrollment {field} {value}: {reason}")]
    Field {
        field: &'static str,
        value: Shown,
        reason: String,
    },
    #[error("enrollment socket: {0}")]
    Io(#[from] std::io::Error),
}

fn field(field: &'static str, value: &str, reason: impl Into<String>) -> EnrollError {
    EnrollError::Field {
        field,
        value: Shown::new(value),
        reason: reason.into(),
    }
}

/// A container ID, interface name or UID: 1..=MAX_ID printable ASCII, no
/// spaces.
fn check_id(name: &'static str, v: &str) -> Result<(), EnrollError> {
    if v.is_empty() {
        return Err(field(name, v, "empty"));
    }
    if v.len() > MAX_ID {
        return Err(field(name, v, format!("longer than {MAX_ID} bytes")));
    }
    if !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(field(
            name,
            v,
            "only printable ASCII without spaces is allowed",
        ));
    }
    Ok(())
}

fn check_attachment_ref(a: &AttachmentRef) -> Result<(), EnrollError> {
    check_id("container_id", &a.container_id)?;
    check_id("ifname", &a.ifname)
}

fn check_pod(p: &PodAttachment) -> Result<(), EnrollError> {
    check_id("container_id", &p.container_id)?;
    check_id("ifname", &p.ifname)?;
    let netns = p
        .netns
        .to_str()
        .ok_or_else(|| field("netns", &p.netns.to_string_lossy(), "not valid UTF-8"))?;
    if !netns.starts_with('/') {
        return Err(field("netns", netns, "not an absolute path"));
    }
    if netns.len() > MAX_PATH {
        return Err(field(
            "netns",
            netns,
            format!("longer than {MAX_PATH} bytes"),
        ));
    }
    if netns.contains('\0') {
        return Err(field("netns", netns, "contains a NUL byte"));
    }
    if netns.split('/').any(|c| c == "..") {
        return Err(field("netns", netns, "contains '..'"));
    }
    crate::identity::dns1123_label(&p.namespace)
        .map_err(|r| field("namespace", &p.namespace, r))?;
    crate::identity::dns1123_subdomain(&p.name).map_err(|r| field("name", &p.name, r))?;
    check_id("uid", &p.uid)?;
    if p.ips.len() > MAX_IPS {
        return Err(field(
            "ips",
            &format!("{} addresses", p.ips.len()),
            format!("more than {MAX_IPS}"),
        ));
    }
    Ok(())
}

fn check_reason(r: &str) -> Result<(), EnrollError> {
    if r.len() > MAX_REASON {
        return Err(field(
            "reason",
            r,
            format!("longer than {MAX_REASON} bytes"),
        ));
    }
    Ok(())
}

impl Request {
    /// Checks every field (the parser calls it; senders call it too, so a
    /// bad value is named on the side that made it).
    pub fn validate(&self) -> Result<(), EnrollError> {
        if self.version != VERSION {
            return Err(EnrollError::Version { got: self.version });
        }
        match &self.op {
            Op::Add { pod } | Op::Check { pod } => check_pod(pod),
            Op::Del { attachment, pod } => {
                if let Some(p) = pod {
                    crate::identity::dns1123_label(&p.namespace)
                        .map_err(|r| field("namespace", &p.namespace, r))?;
                    crate::identity::dns1123_subdomain(&p.name)
                        .map_err(|r| field("name", &p.name, r))?;
                }
                check_attachment_ref(attachment)
            }
            Op::Gc { valid } => {
                if valid.len() > MAX_VALID {
                    return Err(field(
                        "valid",
                        &format!("{} attachments", valid.len()),
                        format!("more than {MAX_VALID}"),
                    ));
                }
                valid.iter().try_for_each(check_attachment_ref)
            }
            Op::Status {} => Ok(()),
        }
    }
}

impl Response {
    pub fn validate(&self) -> Result<(), EnrollError> {
        if self.version != VERSION {
            return Err(EnrollError::Version { got: self.version });
        }
        match &self.outcome {
            Outcome::NotMeshed { reason } | Outcome::Refused { reason } => check_reason(reason),
            Outcome::Captured { .. } | Outcome::Done {} => Ok(()),
        }
    }
}

/// Takes `version` out first, so a peer of another version gets a
/// version error rather than a complaint about a field it does not know;
/// the rest must be exactly one operation's (or outcome's) fields.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(u32, T), EnrollError> {
    if body.is_empty() {
        return Err(EnrollError::Empty);
    }
    if body.len() > MAX_MESSAGE {
        return Err(EnrollError::TooLarge {
            len: body.len(),
            max: MAX_MESSAGE,
        });
    }
    let json = |e: serde_json::Error| EnrollError::Json(text(&e.to_string(), SHOWN_TEXT));
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(json)?;
    let version = match map.remove("version") {
        None => return Err(EnrollError::Json("missing field `version`".into())),
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| {
                EnrollError::Json(format!(
                    "field `version`: {} is not a version number",
                    text(&v.to_string(), 40)
                ))
            })?,
    };
    if version != VERSION {
        return Err(EnrollError::Version { got: version });
    }
    let rest = serde_json::from_value(serde_json::Value::Object(map)).map_err(json)?;
    Ok((version, rest))
}

/// Parses and checks a request body (the frame without its length).
pub fn parse_request(body: &[u8]) -> Result<Request, EnrollError> {
    let (version, op) = parse(body)?;
    let r = Request { version, op };
    r.validate()?;
    Ok(r)
}

/// Parses and checks a response body.
pub fn parse_response(body: &[u8]) -> Result<Response, EnrollError> {
    let (version, outcome) = parse(body)?;
    let r = Response { version, outcome };
    r.validate()?;
    Ok(r)
}

/// The frame for `msg`: length prefix and JSON. Fails if it would pass
/// [`MAX_MESSAGE`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EnrollError> {
    let body = serde_json::to_vec(msg).map_err(|e| EnrollError::Json(e.to_string()))?;
    if body.len() > MAX_MESSAGE {
        return Err(EnrollError::TooLarge {
            len: body.len(),
            max: MAX_MESSAGE,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The body length a frame header announces, refused before any byte of
/// the body is read if it is 0 or over [`MAX_MESSAGE`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, EnrollError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(EnrollError::Empty);
    }
    if len > MAX_MESSAGE {
        return Err(EnrollError::TooLarge {
            len,
            max: MAX_MESSAGE,
        });
    }
    Ok(len)
}

/// Reads one frame's body (blocking; the caller sets the socket timeout).
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, EnrollError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header)?;
    let len = frame_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Writes `msg` as one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), EnrollError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Fuzz entry point for both parsers (for `fuzz/` and the unit tests):
/// panics only on a broken invariant. An accepted message must encode and
/// parse back to itself; a refusal's message must pass
/// [`crate::display::check_message`] (bounded, the value escaped once).
pub fn fuzz_parse(data: &[u8]) {
    let input_run = data.iter().filter(|b| **b == b'\\').count();
    let check = |e: EnrollError| {
        if let Err(why) = crate::display::check_message(&e.to_string(), MAX_ERROR_LEN, input_run) {
            panic!(
                "enrollment message {:?}: {why}",
                String::from_utf8_lossy(data)
            );
        }
    };
    match parse_request(data) {
        Ok(r) => {
            let frame =
                encode(&r).unwrap_or_else(|e| panic!("accepted request does not encode: {e}"));
            let back = parse_request(&frame[4..])
                .unwrap_or_else(|e| panic!("re-encoded request refused: {e}"));
            assert_eq!(back, r, "request does not round-trip");
        }
        Err(e) => check(e),
    }
    match parse_response(data) {
        Ok(r) => {
            let frame =
                encode(&r).unwrap_or_else(|e| panic!("accepted response does not encode: {e}"));
            let back = parse_response(&frame[4..])
                .unwrap_or_else(|e| panic!("re-encoded response refused: {e}"));
            assert_eq!(back, r, "response does not round-trip");
        }
        Err(e) => check(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pod() -> PodAttachment {
        PodAttachment {
            container_id: "c0ffee".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/cni-1234".into(),
            namespace: "default".into(),
            name: "web-1".into(),
            uid: "7f3e2a9c-1b2d-4e5f-8a9b-0c1d2e3f4a5b".into(),
            ips: vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        }
    }

    fn body(frame: &[u8]) -> &[u8] {
        &frame[4..]
    }

    #[test]
    fn an_add_request_round_trips_through_a_frame() {
        let req = Request::new(Op::Add { pod: pod() });
        let frame = encode(&req).unwrap();
        assert_eq!(
            frame_len(frame[..4].try_into().unwrap()).unwrap(),
            frame.len() - 4
        );
        let back = read_frame(&mut &frame[..]).unwrap();
        assert_eq!(parse_request(&back).unwrap(), req);
        let text = String::from_utf8(back).unwrap();
        assert!(
            text.starts_with(r#"{"version":1,"op":"add","pod":{"#),
            "{text}"
        );
    }

    #[test]
    fn every_response_round_trips() {
        for o in [
            Outcome::Captured { netns_cookie: 4711 },
            Outcome::NotMeshed {
                reason: "namespace default is not opted in".into(),
            },
            Outcome::Refused {
                reason: "CA unreachable".into(),
            },
            Outcome::Done {},
        ] {
            let r = Response::new(o);
            let f = encode(&r).unwrap();
            assert_eq!(parse_response(body(&f)).unwrap(), r);
        }
    }

    #[test]
    fn another_version_is_named_before_its_unknown_fields() {
        let e = parse_request(br#"{"version":2,"op":"teleport","x":1}"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("version 2: this side speaks version 1"),
            "{e}"
        );
        let e = parse_response(br#"{"version":0,"result":"done"}"#).unwrap_err();
        assert!(matches!(e, EnrollError::Version { got: 0 }), "{e}");
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        let e = parse_request(br#"{"version":1,"op":"status","extra":true}"#).unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = parse_request(br#"{"version":1,"op":"teleport"}"#).unwrap_err();
        assert!(e.to_string().contains("teleport"), "{e}");
        let e = parse_request(br#"{"op":"status"}"#).unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
    }

    #[test]
    fn bad_fields_are_named_with_their_value() {
        type Mutation = fn(&mut PodAttachment);
        let cases: &[(Mutation, &str)] = &[
            (
                |p| p.netns = "relative/ns".into(),
                "netns \"relative/ns\": not an absolute path",
            ),
            (
                |p| p.netns = "/proc/../etc".into(),
                "netns \"/proc/../etc\": contains '..'",
            ),
            (|p| p.namespace = "Default".into(), "namespace \"Default\""),
            (|p| p.name = "web_1".into(), "name \"web_1\""),
            (|p| p.uid = String::new(), "uid \"\": empty"),
            (|p| p.container_id = "a b".into(), "container_id \"a b\""),
            (|p| p.ifname = "x".repeat(300), "ifname \"xxxx"),
            (
                |p| p.ips = vec!["10.0.0.1".parse().unwrap(); 17],
                "ips \"17 addresses\": more than 16",
            ),
        ];
        for (mutate, want) in cases {
            let mut p = pod();
            mutate(&mut p);
            let req = Request::new(Op::Add { pod: p });
            let json = serde_json::to_vec(&req).unwrap();
            let e = parse_request(&json).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(e.len() < 1000, "unbounded: {e}");
            // The sender's own check names the same value.
            assert_eq!(req.validate().unwrap_err().to_string(), e);
        }
    }

    #[test]
    fn frames_over_the_limit_are_refused_before_their_body_is_read() {
        let header = ((MAX_MESSAGE + 1) as u32).to_be_bytes();
        let e = frame_len(header).unwrap_err();
        assert!(
            e.to_string().contains(&format!("{}", MAX_MESSAGE + 1)),
            "{e}"
        );
        // A reader that would hand out a huge body is never asked for it.
        let mut r = std::io::Cursor::new(header.to_vec());
        assert!(matches!(
            read_frame(&mut r),
            Err(EnrollError::TooLarge { .. })
        ));
        assert!(matches!(frame_len([0; 4]), Err(EnrollError::Empty)));
        let big = Request::new(Op::Gc {
            valid: vec![
                AttachmentRef {
                    container_id: "c".repeat(MAX_ID),
                    ifname: "eth0".into()
                };
                MAX_VALID
            ],
        });
        assert!(matches!(encode(&big), Err(EnrollError::TooLarge { .. })));
    }

    #[test]
    fn a_truncated_frame_is_an_io_error() {
        let frame = encode(&Request::new(Op::Status {})).unwrap();
        let e = read_frame(&mut &frame[..frame.len() - 1]).unwrap_err();
        assert!(matches!(e, EnrollError::Io(_)), "{e}");
    }

    /// The fuzz target's body (`fuzz/fuzz_targets/enroll.rs`) over its
    /// seeds, valid requests and responses among them.
    #[test]
    fn the_fuzz_body_holds_over_its_seeds() {
        let seeds = crate::display::fuzz_seeds("enroll");
        let accepted = seeds
            .iter()
            .filter(|s| parse_request(s).is_ok() || parse_response(s).is_ok())
            .count();
        assert!(accepted >= 5, "{accepted} valid seeds");
        for seed in &seeds {
            fuzz_parse(seed);
        }
    }

    fn arb_pod() -> impl Strategy<Value = PodAttachment> {
        (
            "[a-f0-9]{1,64}",
            "[a-z][a-z0-9]{0,14}",
            "(/[a-zA-Z0-9_-]{1,20}){1,4}",
            "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
            "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]{1,10}){0,3}",
            "[a-f0-9-]{1,40}",
            prop::collection::vec(any::<std::net::IpAddr>(), 0..=MAX_IPS),
        )
            .prop_map(|(c, i, n, ns, name, uid, ips)| PodAttachment {
                container_id: c,
                ifname: i,
                netns: n.into(),
                namespace: ns,
                name,
                uid,
                ips,
            })
    }

    proptest! {
        #[test]
        fn valid_requests_round_trip(p in arb_pod(), op in 0u8..5) {
            let op = match op {
                0 => Op::Add { pod: p },
                1 => Op::Check { pod: p },
                2 => Op::Del {
                    pod: Some(PodName { namespace: p.namespace.clone(), name: p.name.clone() }),
                    attachment: AttachmentRef { container_id: p.container_id, ifname: p.ifname },
                },
                3 => Op::Gc { valid: vec![AttachmentRef { container_id: p.container_id, ifname: p.ifname }] },
                _ => Op::Status {},
            };
            let req = Request::new(op);
            let frame = encode(&req).unwrap();
            prop_assert_eq!(parse_request(&read_frame(&mut &frame[..]).unwrap()).unwrap(), req);
        }

        #[test]
        fn the_fuzz_invariants_hold_for_json_shaped_input(data in r#"\{"version":1,"(op|result)":"(add|check|del|gc|status|captured|refused|done|not_meshed)"(,"[a-z_]{1,12}":("[^"]{0,80}"|[0-9]{1,5}|\{\}|\[\]))*\}"#) {
            fuzz_parse(data.as_bytes());
        }

        #[test]
        fn any_bytes_parse_or_fail_with_a_bounded_message(data in prop::collection::vec(any::<u8>(), 0..2048)) {
            fuzz_parse(&data);
            match parse_request(&data) {
                Ok(r) => prop_assert!(r.validate().is_ok()),
                Err(e) => {
                    let m = e.to_string();
                    prop_assert!(m.len() < 1200, "{}", m);
                    prop_assert!(!m.contains('\n'), "{}", m);
                }
            }
            let _ = parse_response(&data);
        }

        #[test]
        fn mutated_valid_requests_never_panic(p in arb_pod(), at in any::<prop::sample::Index>(), b in any::<u8>()) {
            let mut json = serde_json::to_vec(&Request::new(Op::Add { pod: p })).unwrap();
            let i = at.index(json.len());
            json[i] = b;
            if let Ok(r) = parse_request(&json) {
                prop_assert!(r.validate().is_ok());
            }
        }
    }
}
