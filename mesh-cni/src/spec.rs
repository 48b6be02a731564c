//! The CNI exec protocol (spec 1.1): commands, environment, network
//! configuration on stdin, results and errors on stdout.
//!
//! Everything here is input from the container runtime: read bounded,
//! parsed strictly where mesh-cni depends on it, and refused with the
//! spec's error code and a message naming the variable or key.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::display::{bounded, bounded_len, text_len};
use serde_json::{Map, Value};

/// CNI versions whose configuration and results mesh-cni accepts (the
/// result is passed through, so every result format works).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version mesh-cni answers VERSION and early errors with.
pub const CURRENT_VERSION: &str = "1.1.0";
/// Largest network configuration read from stdin.
pub const MAX_CONFIG: usize = 1024 * 1024;
/// Where the node proxy serves enrollment unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/sockmesh/cni.sock";
/// Bound of one exchange with the node proxy unless the config says
/// otherwise (enrollment may wait for a certificate from the CA).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_TIMEOUT_SECONDS: u64 = 300;
/// Longest value of one `CNI_ARGS` entry or environment variable shown.
const SHOWN: usize = 64;
/// Bytes of a library message (serde_json's) an error shows.
const SHOWN_TEXT: usize = 200;
/// Longest message ([`CniError`]'s `Display`: code, `msg`, `details`) that
/// parsing the network configuration can give: the longest fixed text, one
/// value shown and one library message (the fuzz target asserts it).
pub const MAX_ERROR_LEN: usize = 192 + bounded_len(SHOWN) + text_len(SHOWN_TEXT);

/// The spec's well-known error codes (and mesh-cni's own, 100+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADD.
    NotAvailable = 50,
    /// CHECK: the pod is attached but the node proxy does not capture it.
    NotCaptured = 100,
}

/// An error as the spec's JSON: `{"cniVersion","code","msg","details"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {}: {msg}{}", *code as u32, if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON the runtime reads from stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

fn env_error(var: &str, value: Option<&str>, reason: &str) -> CniError {
    CniError::new(
        Code::InvalidEnvironment,
        format!("{var}: {reason}"),
        value
            .map(|v| format!("{var}={}", bounded(v, SHOWN)))
            .unwrap_or_default(),
    )
}

fn config_error(key: &str, reason: impl Into<String>) -> CniError {
    CniError::new(
        Code::InvalidConfig,
        format!("network configuration key {key:?}: {}", reason.into()),
        "",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

/// The environment of one invocation, checked for the command it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`, `K=V;K=V`.
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// Reads `CNI_*` from `get` (the process environment, or a map in
    /// tests).
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let raw = get("CNI_COMMAND");
        let command = match raw.as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(env_error(
                    "CNI_COMMAND",
                    Some(other),
                    "not one of ADD, DEL, CHECK, STATUS, GC, VERSION",
                ));
            }
            None => return Err(env_error("CNI_COMMAND", None, "not set")),
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let required = |var: &str| -> Result<String, CniError> {
            match get(var) {
                Some(v) if !v.is_empty() => Ok(v),
                Some(v) => Err(env_error(var, Some(&v), "empty")),
                None => Err(env_error(var, None, "not set")),
            }
        };
        let (container_id, ifname) = if per_container {
            let c = required("CNI_CONTAINERID")?;
            if c.len() > mesh_core::enroll::MAX_ID || !c.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(env_error(
                    "CNI_CONTAINERID",
                    Some(&c),
                    "not a container ID (printable ASCII, at most 256 bytes)",
                ));
            }
            let i = required("CNI_IFNAME")?;
            if i.len() > 15 || i.contains('/') || !i.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(env_error(
                    "CNI_IFNAME",
                    Some(&i),
                    "not an interface name (at most 15 bytes, no '/')",
                ));
            }
            (c, i)
        } else {
            (String::new(), String::new())
        };
        let netns = match command {
            Command::Add | Command::Check => {
                let n = required("CNI_NETNS")?;
                if !n.starts_with('/') {
                    return Err(env_error("CNI_NETNS", Some(&n), "not an absolute path"));
                }
                Some(PathBuf::from(n))
            }
            // DEL: the netns may be gone already.
            _ => get("CNI_NETNS")
                .filter(|n| !n.is_empty())
                .map(PathBuf::from),
        };
        let args = match get("CNI_ARGS") {
            Some(a) if per_container => parse_args(&a)?,
            _ => BTreeMap::new(),
        };
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

/// `CNI_ARGS`: `K=V` pairs separated by `;` (bounded: 64 pairs, 4 KiB).
pub fn parse_args(raw: &str) -> Result<BTreeMap<String, String>, CniError> {
    if raw.len() > 4096 {
        return Err(env_error("CNI_ARGS", Some(raw), "longer than 4096 bytes"));
    }
    let mut out = BTreeMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(env_error(
                "CNI_ARGS",
                Some(pair),
                "an entry is not KEY=VALUE",
            ));
        };
        if k.is_empty() {
            return Err(env_error(
                "CNI_ARGS",
                Some(pair),
                "an entry has an empty key",
            ));
        }
        out.insert(k.to_owned(), v.to_owned());
        if out.len() > 64 {
            return Err(env_error("CNI_ARGS", Some(raw), "more than 64 entries"));
        }
    }
    Ok(out)
}

/// The Kubernetes pod a sandbox belongs to, from `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// `None` when CNI_ARGS names no pod (a container started outside
/// Kubernetes); an error when it names one only in part.
pub fn k8s_pod(args: &BTreeMap<String, String>) -> Result<Option<K8sPod>, CniError> {
    let ns = args.get("K8S_POD_NAMESPACE");
    let name = args.get("K8S_POD_NAME");
    if ns.is_none() && name.is_none() {
        return Ok(None);
    }
    let get = |k: &str| -> Result<String, CniError> {
        match args.get(k) {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            v => Err(env_error(
                "CNI_ARGS",
                v.map(String::as_str),
                &format!(
                    "{k} missing or empty (K8S_POD_NAMESPACE, K8S_POD_NAME and K8S_POD_UID go together)"
                ),
            )),
        }
    };
    Ok(Some(K8sPod {
        namespace: get("K8S_POD_NAMESPACE")?,
        name: get("K8S_POD_NAME")?,
        uid: get("K8S_POD_UID")?,
    }))
}

/// The network configuration on stdin: the common keys, `prevResult`
/// kept as it came, and mesh-cni's own keys.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Vec<(String, String)>,
    /// `args.cni`: string arguments the runtime put in the configuration
    /// (conventions: the same keys as `CNI_ARGS`; `CNI_ARGS` wins). Lets a
    /// runtime that passes no `CNI_ARGS` (`ctr run --cni`) name the pod.
    pub conf_args: BTreeMap<String, String>,
    pub socket: PathBuf,
    pub log_file: Option<PathBuf>,
    pub log_level: String,
    pub timeout: Duration,
    /// Namespaces whose pods start unmeshed when the node proxy is down.
    pub fail_open_namespaces: Vec<String>,
}

/// `a.b.c` as numbers, for ordering versions.
pub fn version_tuple(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(t)
}

/// The `cniVersion` of whatever came on stdin, if it names one (errors
/// answer in the caller's version where it can be read).
pub fn declared_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_owned)
}

fn string_key(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(config_error(
            key,
            format!(
                "must be a string, not {}",
                bounded(&other.to_string(), SHOWN)
            ),
        )),
    }
}

impl NetConf {
    /// Parses stdin for `command`. Version errors come first (code 1),
    /// then JSON (6), then keys (7).
    pub fn parse(stdin: &[u8], command: Command) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                "network configuration is not JSON",
                mesh_core::display::text(&e.to_string(), SHOWN_TEXT),
            )
        })?;
        let Value::Object(obj) = v else {
            return Err(CniError::new(
                Code::Decode,
                "network configuration is not a JSON object",
                "",
            ));
        };
        let cni_version =
            string_key(&obj, "cniVersion")?.ok_or_else(|| config_error("cniVersion", "missing"))?;
        let t = version_tuple(&cni_version);
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {} is not supported",
                    bounded(&cni_version, SHOWN)
                ),
                format!("supported versions: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let min = match command {
            Command::Check => Some((0, 4, 0)),
            Command::Status | Command::Gc => Some((1, 1, 0)),
            _ => None,
        };
        if let (Some(min), Some(t)) = (min, t)
            && t < min
        {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "{command:?} needs cniVersion {}.{}.{} or later; the configuration says {cni_version}",
                    min.0, min.1, min.2
                ),
                "",
            ));
        }
        let name = string_key(&obj, "name")?.unwrap_or_default();
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(p @ Value::Object(_)) => Some(p.clone()),
            Some(other) => {
                return Err(config_error(
                    "prevResult",
                    format!(
                        "must be an object, not {}",
                        bounded(&other.to_string(), SHOWN)
                    ),
                ));
            }
        };
        let conf_args = match obj.get("args").and_then(|a| a.get("cni")) {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) => m
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .take(64)
                .collect(),
            Some(other) => {
                return Err(config_error(
                    "args.cni",
                    format!(
                        "must be an object, not {}",
                        bounded(&other.to_string(), SHOWN)
                    ),
                ));
            }
        };
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|e| {
                    let c = e.get("containerID").and_then(Value::as_str);
                    let i = e.get("ifname").and_then(Value::as_str);
                    match (c, i) {
                        (Some(c), Some(i)) => Ok((c.to_owned(), i.to_owned())),
                        _ => Err(config_error(
                            "cni.dev/valid-attachments",
                            format!(
                                "entry {} lacks containerID or ifname",
                                bounded(&e.to_string(), SHOWN)
                            ),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(config_error(
                    "cni.dev/valid-attachments",
                    format!("must be a list, not {}", bounded(&other.to_string(), SHOWN)),
                ));
            }
        };
        let socket = string_key(&obj, "socket")?.unwrap_or_else(|| DEFAULT_SOCKET.into());
        if !socket.starts_with('/') {
            return Err(config_error(
                "socket",
                format!("{} is not an absolute path", bounded(&socket, SHOWN)),
            ));
        }
        let log_file = string_key(&obj, "logFile")?;
        if let Some(l) = &log_file
            && !l.starts_with('/')
        {
            return Err(config_error(
                "logFile",
                format!("{} is not an absolute path", bounded(l, SHOWN)),
            ));
        }
        let log_level = string_key(&obj, "logLevel")?.unwrap_or_else(|| "info".into());
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            return Err(config_error(
                "logLevel",
                format!(
                    "{} is not one of error, warn, info, debug, trace",
                    bounded(&log_level, SHOWN)
                ),
            ));
        }
        let timeout = match obj.get("timeoutSeconds") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT,
            Some(v) => match v.as_u64() {
                Some(s) if (1..=MAX_TIMEOUT_SECONDS).contains(&s) => Duration::from_secs(s),
                _ => {
                    return Err(config_error(
                        "timeoutSeconds",
                        format!(
                            "{} is not a whole number of seconds in 1..={MAX_TIMEOUT_SECONDS}",
                            bounded(&v.to_string(), SHOWN)
                        ),
                    ));
                }
            },
        };
        let fail_open_namespaces = match obj.get("failOpenNamespaces") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|n| {
                    let shown = n.as_str().map_or_else(|| n.to_string(), str::to_owned);
                    match n.as_str() {
                        Some(s) if mesh_core::identity::dns1123_label(s).is_ok() => {
                            Ok(s.to_owned())
                        }
                        _ => Err(config_error(
                            "failOpenNamespaces",
                            format!("{} is not a namespace name", bounded(&shown, SHOWN)),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(config_error(
                    "failOpenNamespaces",
                    format!("must be a list, not {}", bounded(&other.to_string(), SHOWN)),
                ));
            }
        };
        Ok(NetConf {
            cni_version,
            name,
            prev_result,
            valid_attachments,
            conf_args,
            socket: socket.into(),
            log_file: log_file.map(PathBuf::from),
            log_level,
            timeout,
            fail_open_namespaces,
        })
    }

    pub fn fails_open(&self, namespace: &str) -> bool {
        self.fail_open_namespaces.iter().any(|n| n == namespace)
    }
}

/// The addresses a result assigns (`ips[].address`, CIDR notation; the
/// same key in every result version since 0.3.0).
pub fn result_ips(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let Some(ips) = result.get("ips") else {
        return Ok(Vec::new());
    };
    let Value::Array(ips) = ips else {
        return Err(config_error("prevResult.ips", "must be a list"));
    };
    ips.iter()
        .map(|e| {
            let a = e.get("address").and_then(Value::as_str).ok_or_else(|| {
                config_error(
                    "prevResult.ips",
                    format!("entry {} has no address", bounded(&e.to_string(), SHOWN)),
                )
            })?;
            let ip = a.split_once('/').map_or(a, |(ip, _)| ip);
            ip.parse().map_err(|_| {
                config_error(
                    "prevResult.ips",
                    format!("address {} is not IP/PREFIX", bounded(a, SHOWN)),
                )
            })
        })
        .collect()
}

/// `prevResult` as the result of this plugin: unchanged, with the
/// configuration's `cniVersion` where the runtime left it out.
pub fn pass_through(conf: &NetConf, prev: &Value) -> Value {
    let mut out = prev.clone();
    if let Value::Object(o) = &mut out {
        o.entry("cniVersion")
            .or_insert_with(|| Value::String(conf.cni_version.clone()));
    }
    out
}

/// What VERSION prints.
pub fn version_info() -> Value {
    serde_json::json!({
        "cniVersion": CURRENT_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// Fuzz entry (for `fuzz/` and the unit tests): `data` as the network
/// configuration of every command, and its `prevResult` through
/// [`result_ips`]. Panics only on a broken invariant: a refusal's message
/// must pass [`mesh_core::display::check_message`] (at most
/// [`MAX_ERROR_LEN`] bytes, no control character, values escaped once);
/// an accepted configuration holds only values [`NetConf::parse`] allows.
pub fn fuzz_parse(data: &[u8]) {
    // Values shown are decoded JSON strings: every escape that makes a
    // backslash starts with one.
    let input_run = data.iter().filter(|b| **b == b'\\').count();
    let check = |what: &str, e: CniError| {
        if let Err(why) =
            mesh_core::display::check_message(&e.to_string(), MAX_ERROR_LEN, input_run)
        {
            panic!("{what} {:?}: {why}", String::from_utf8_lossy(data));
        }
    };
    let _ = declared_version(data);
    for command in [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Status,
        Command::Gc,
        Command::Version,
    ] {
        match NetConf::parse(data, command) {
            Err(e) => check("network configuration", e),
            Ok(conf) => {
                assert!(
                    SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()),
                    "accepted cniVersion {:?}",
                    conf.cni_version
                );
                assert!(
                    conf.socket.is_absolute(),
                    "accepted socket {:?}",
                    conf.socket
                );
                assert!(
                    conf.log_file.as_ref().is_none_or(|l| l.is_absolute()),
                    "accepted logFile {:?}",
                    conf.log_file
                );
                assert!(
                    (1..=MAX_TIMEOUT_SECONDS).contains(&conf.timeout.as_secs()),
                    "accepted timeout {:?}",
                    conf.timeout
                );
                if let Some(prev) = &conf.prev_result
                    && let Err(e) = result_ips(prev)
                {
                    check("prevResult", e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::parse(|k| m.get(k).cloned())
    }

    #[test]
    fn add_needs_its_variables_and_names_the_missing_one() {
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment);
        assert!(e.msg.contains("CNI_CONTAINERID"), "{e}");
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "netns/x"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("CNI_NETNS=\"netns/x\""), "{e}");
        let e = env(&[("CNI_COMMAND", "ATTACH")]).unwrap_err();
        assert!(e.to_string().contains("\"ATTACH\""), "{e}");
        // DEL without a netns is fine: it may be gone.
        let d = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(d.netns, None);
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
    }

    #[test]
    fn args_in_the_configuration_are_read_as_strings() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","args":{"cni":{"K8S_POD_NAME":"web-1","labels":[1]}}}"#,
            Command::Add,
        )
        .unwrap();
        assert_eq!(
            c.conf_args.get("K8S_POD_NAME").map(String::as_str),
            Some("web-1")
        );
        assert!(!c.conf_args.contains_key("labels"));
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","args":{"cni":7}}"#, Command::Add)
            .unwrap_err();
        assert!(e.msg.contains("args.cni"), "{e}");
    }

    #[test]
    fn cni_args_give_the_pod_or_nothing() {
        let a = parse_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_UID=u-1;K8S_POD_INFRA_CONTAINER_ID=c",
        )
        .unwrap();
        assert_eq!(
            k8s_pod(&a).unwrap(),
            Some(K8sPod {
                namespace: "default".into(),
                name: "web-1".into(),
                uid: "u-1".into()
            })
        );
        assert_eq!(
            k8s_pod(&parse_args("IgnoreUnknown=1").unwrap()).unwrap(),
            None
        );
        let e = k8s_pod(&parse_args("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b").unwrap()).unwrap_err();
        assert!(e.msg.contains("K8S_POD_UID"), "{e}");
        assert!(
            parse_args("novalue")
                .unwrap_err()
                .to_string()
                .contains("\"novalue\"")
        );
    }

    #[test]
    fn versions_are_checked_before_keys() {
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","socket":7}"#, Command::Add).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        let e = NetConf::parse(br#"{"cniVersion":"0.3.1"}"#, Command::Status).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        assert!(e.msg.contains("1.1.0"), "{e}");
        let e = NetConf::parse(b"{not json", Command::Add).unwrap_err();
        assert_eq!(e.code, Code::Decode);
        let e = NetConf::parse(
            br#"{"cniVersion":"1.0.0","timeoutSeconds":0}"#,
            Command::Add,
        )
        .unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.contains("timeoutSeconds"), "{e}");
        let e = NetConf::parse(
            br#"{"cniVersion":"1.0.0","failOpenNamespaces":["Kube System"]}"#,
            Command::Add,
        )
        .unwrap_err();
        assert!(e.msg.contains("\"Kube System\""), "{e}");
    }

    #[test]
    fn results_of_every_version_give_their_addresses() {
        let r03: Value = serde_json::from_str(
            r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.5/24","gateway":"10.1.0.1"}]}"#,
        )
        .unwrap();
        let r11: Value = serde_json::from_str(
            r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.0.5/24","interface":0},{"address":"fd00::5/64"}]}"#,
        )
        .unwrap();
        assert_eq!(
            result_ips(&r03).unwrap(),
            vec!["10.1.0.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(result_ips(&r11).unwrap().len(), 2);
        let bad: Value = serde_json::from_str(r#"{"ips":[{"address":"ten/8"}]}"#).unwrap();
        assert!(result_ips(&bad).unwrap_err().msg.contains("\"ten/8\""));
    }

    #[test]
    fn errors_are_the_spec_json() {
        let e = CniError::new(Code::TryAgainLater, "proxy down", "socket /x");
        assert_eq!(
            e.to_json("1.1.0"),
            serde_json::json!({"cniVersion":"1.1.0","code":11,"msg":"proxy down","details":"socket /x"})
        );
    }

    /// The fuzz target's body (`fuzz/fuzz_targets/cni_config.rs`) over
    /// its seeds, which hold configurations every command accepts.
    #[test]
    fn the_fuzz_body_holds_over_its_seeds() {
        let seeds = mesh_core::display::fuzz_seeds("cni_config");
        let accepted = seeds
            .iter()
            .filter(|s| NetConf::parse(s, Command::Add).is_ok())
            .count();
        assert!(accepted >= 3, "{accepted} valid seeds");
        for seed in &seeds {
            fuzz_parse(seed);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_config_parses_or_is_refused_with_a_spec_code(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Err(e) = NetConf::parse(&data, Command::Add) {
                proptest::prop_assert!(matches!(e.code, Code::Decode | Code::InvalidConfig | Code::IncompatibleVersion));
            }
        }

        #[test]
        fn any_cni_args_parse_or_are_refused_naming_cni_args(raw in ".{0,300}") {
            if let Err(e) = parse_args(&raw) {
                proptest::prop_assert!(e.msg.starts_with("CNI_ARGS"));
            }
        }
    }
}
