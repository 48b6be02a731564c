//! What each CNI command does.
//!
//! - ADD: the pod (netns, namespace/name/UID from `CNI_ARGS`, addresses
//!   from `prevResult`) goes to the node proxy, which answers once the
//!   pod is captured; only then does ADD return `prevResult`, unchanged.
//!   Proxy down or refusing: code 11 (the runtime retries: fail closed),
//!   unless the pod's namespace is listed in `failOpenNamespaces`.
//! - DEL: tells the proxy; succeeds whatever the proxy's state
//!   (idempotent; a proxy that was down drops attachments whose netns is
//!   gone by itself).
//! - CHECK: the proxy must still capture the pod.
//! - STATUS: ready only while the proxy answers.
//! - GC: the proxy releases every attachment the runtime no longer lists.

use std::io::Read;

use mesh_core::enroll::{AttachmentRef, Op, Outcome, PodAttachment};
use serde_json::Value;
use tracing::{info, warn};

use crate::agent::{self, AgentError};
use crate::spec::{self, CniError, Code, Command, Env, NetConf};

/// Reads stdin, bounded by [`spec::MAX_CONFIG`].
pub fn read_stdin(r: impl Read) -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    r.take(spec::MAX_CONFIG as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| CniError::new(Code::Io, "reading the network configuration", e.to_string()))?;
    if buf.len() > spec::MAX_CONFIG {
        return Err(CniError::new(
            Code::Decode,
            format!(
                "network configuration is larger than {} bytes",
                spec::MAX_CONFIG
            ),
            "",
        ));
    }
    Ok(buf)
}

fn prev_result(conf: &NetConf) -> Result<&Value, CniError> {
    conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "prevResult missing: mesh-cni is a chained plugin; list it after the plugin that assigns the pod's addresses",
            "",
        )
    })
}

/// The pod to enroll, or `None` when the sandbox is not a Kubernetes pod.
fn attachment(env: &Env, conf: &NetConf) -> Result<Option<PodAttachment>, CniError> {
    // CNI_ARGS first; `args.cni` of the configuration fills what it lacks.
    let mut args = conf.conf_args.clone();
    args.extend(env.args.clone());
    let Some(pod) = spec::k8s_pod(&args)? else {
        return Ok(None);
    };
    let netns = env
        .netns
        .clone()
        .ok_or_else(|| CniError::new(Code::InvalidEnvironment, "CNI_NETNS: not set", ""))?;
    let ips = spec::result_ips(prev_result(conf)?)?;
    let a = PodAttachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns,
        namespace: pod.namespace,
        name: pod.name,
        uid: pod.uid,
        ips,
    };
    // Checked here too, so a bad value is named as the runtime gave it.
    mesh_core::enroll::Request::new(Op::Add { pod: a.clone() })
        .validate()
        .map_err(|e| {
            CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_ARGS/CNI_NETNS: {e}"),
                "",
            )
        })?;
    Ok(Some(a))
}

/// Runs one command; `Ok(Some(json))` is printed on stdout.
pub fn execute(env: &Env, conf: &NetConf) -> Result<Option<Value>, CniError> {
    match env.command {
        Command::Version => Ok(Some(spec::version_info())),
        Command::Add => add(env, conf),
        Command::Check => check(env, conf).map(|()| None),
        Command::Del => {
            del(env, conf);
            Ok(None)
        }
        Command::Status => status(conf).map(|()| None),
        Command::Gc => gc(conf).map(|()| None),
    }
}

fn add(env: &Env, conf: &NetConf) -> Result<Option<Value>, CniError> {
    let prev = prev_result(conf)?;
    let Some(pod) = attachment(env, conf)? else {
        info!(container = %env.container_id, "not a Kubernetes pod (no K8S_POD_* in CNI_ARGS): not meshed");
        return Ok(Some(spec::pass_through(conf, prev)));
    };
    let key = pod.key();
    // A netns that is not there cannot be captured: say so now, rather
    // than as a proxy error later.
    if !pod.netns.exists() {
        return Err(CniError::new(
            Code::InvalidEnvironment,
            format!("CNI_NETNS: {} does not exist", pod.netns.display()),
            format!("pod {key}"),
        ));
    }
    let namespace = pod.namespace.clone();
    let attached = pod.clone();
    match agent::ask(&conf.socket, Op::Add { pod }, conf.timeout) {
        Ok(r) => match r.outcome {
            Outcome::Captured { netns_cookie } => {
                info!(pod = %key, container = %env.container_id, netns_cookie, "pod captured by the node proxy");
                Ok(Some(spec::pass_through(conf, prev)))
            }
            Outcome::NotMeshed { reason } => {
                info!(pod = %key, %reason, "pod not meshed");
                Ok(Some(spec::pass_through(conf, prev)))
            }
            Outcome::Refused { reason } => Err(CniError::new(
                Code::TryAgainLater,
                format!("node proxy refused pod {key}"),
                reason,
            )),
            Outcome::Done {} => Err(CniError::new(
                Code::TryAgainLater,
                format!("node proxy answered ADD of {key} with done, not captured"),
                "",
            )),
        },
        Err(e) => unreachable_or_fail(conf, Some(&attached), &namespace, &key, e)
            .map(|()| Some(spec::pass_through(conf, prev))),
    }
}

/// Where fail-open records go: `fail-open/` beside the proxy's socket.
pub fn fail_open_dir(socket: &std::path::Path) -> std::path::PathBuf {
    socket
        .parent()
        .unwrap_or(std::path::Path::new("/"))
        .join("fail-open")
}

/// The record a fail-open ADD leaves for the node proxy: which pod runs
/// unmeshed, in which netns, and why. The proxy enrolls the pod from it
/// once it is back, counts such pods in a metric, and removes the record.
fn record_fail_open(conf: &NetConf, pod: &PodAttachment, reason: &str) {
    let dir = fail_open_dir(&conf.socket);
    let record = serde_json::json!({
        "version": mesh_core::enroll::VERSION,
        "pod": pod,
        "reason": reason.chars().take(mesh_core::enroll::MAX_REASON / 2).collect::<String>(),
    });
    let name = format!("{}.{}", pod.namespace, pod.name);
    let r = std::fs::create_dir_all(&dir).and_then(|()| {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, record.to_string())?;
        std::fs::rename(&tmp, dir.join(format!("{name}.json")))
    });
    if let Err(e) = r {
        warn!(pod = %pod.key(), dir = %dir.display(), error = %e, "fail-open record not written; the proxy finds the pod by its cgroup instead");
    }
}

/// Proxy not there: fail closed (code 11), or open where configured.
fn unreachable_or_fail(
    conf: &NetConf,
    pod: Option<&PodAttachment>,
    namespace: &str,
    key: &str,
    e: AgentError,
) -> Result<(), CniError> {
    if conf.fails_open(namespace) {
        warn!(pod = %key, error = %e, status = "fail-open: started without the mesh",
              "FAIL-OPEN: node proxy unavailable and namespace {namespace} is in failOpenNamespaces; the pod runs unmeshed until the node proxy enrolls it");
        if let Some(pod) = pod {
            record_fail_open(conf, pod, &e.to_string());
        }
        return Ok(());
    }
    Err(CniError::new(
        Code::TryAgainLater,
        format!("pod {key} not meshed: node proxy unavailable (fail closed; retry later)"),
        e.to_string(),
    ))
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    prev_result(conf)?;
    let Some(pod) = attachment(env, conf)? else {
        return Ok(());
    };
    let key = pod.key();
    let namespace = pod.namespace.clone();
    match agent::ask(&conf.socket, Op::Check { pod }, conf.timeout) {
        Ok(r) => match r.outcome {
            Outcome::Captured { .. } | Outcome::NotMeshed { .. } | Outcome::Done {} => Ok(()),
            Outcome::Refused { reason } => Err(CniError::new(
                Code::NotCaptured,
                format!("pod {key} is not captured by the node proxy"),
                reason,
            )),
        },
        Err(e) => unreachable_or_fail(conf, None, &namespace, &key, e),
    }
}

fn del(env: &Env, conf: &NetConf) {
    let attachment = AttachmentRef {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let mut args = conf.conf_args.clone();
    args.extend(env.args.clone());
    let pod = spec::k8s_pod(&args)
        .ok()
        .flatten()
        .map(|p| mesh_core::enroll::PodName {
            namespace: p.namespace,
            name: p.name,
        });
    match agent::ask(&conf.socket, Op::Del { attachment, pod }, conf.timeout) {
        Ok(_) => info!(container = %env.container_id, "released"),
        // DEL must succeed: a proxy that is down drops attachments whose
        // netns is gone when it starts.
        Err(e) => {
            warn!(container = %env.container_id, error = %e, "DEL: node proxy not told; it drops the pod when its netns is gone")
        }
    }
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    match agent::ask(&conf.socket, Op::Status {}, conf.timeout) {
        Ok(r) if r.outcome == (Outcome::Done {}) => Ok(()),
        Ok(r) => Err(CniError::new(
            Code::NotAvailable,
            "node proxy not ready",
            format!("{:?}", r.outcome),
        )),
        Err(e) => Err(CniError::new(
            Code::NotAvailable,
            "node proxy not available: new pods would not be meshed",
            e.to_string(),
        )),
    }
}

fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid: Vec<AttachmentRef> = conf
        .valid_attachments
        .iter()
        .map(|(c, i)| AttachmentRef {
            container_id: c.clone(),
            ifname: i.clone(),
        })
        .collect();
    if valid.len() > mesh_core::enroll::MAX_VALID {
        // Too many to send in one frame: collect nothing rather than
        // release pods the runtime still has.
        warn!(
            valid = valid.len(),
            "GC: more valid attachments than one request carries; skipped"
        );
        return Ok(());
    }
    match agent::ask(&conf.socket, Op::Gc { valid }, conf.timeout) {
        Ok(_) => Ok(()),
        Err(e) => {
            warn!(error = %e, "GC: node proxy not reachable; nothing collected");
            Ok(())
        }
    }
}
