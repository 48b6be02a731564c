//! `mesh explain`: one answer that joins the kernel's view (enrolled?
//! redirected? counters), the proxy's (route, endpoint, tunnel, expected
//! peer identity) and the policy decision with the rule that made it —
//! from the source pod's node proxy (`GET /explain`). Verdict first.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use mesh_local::{Mesh, PodInfo};
use serde::Deserialize;
use serde_json::Value;

use crate::admin::{self, ExplainFlow, Flow};
use crate::cli::ExplainArgs;
use crate::failure::{Failure, code, name_flag, require_root};
use crate::paint::{Paint, Style};
use crate::table::Table;
use crate::units;

/// A Service as the registry file lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RegistryService {
    pub namespace: String,
    pub name: String,
    pub vip: IpAddr,
    #[serde(default)]
    pub ports: Vec<RegistryPort>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RegistryPort {
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
struct RegistryFile {
    #[serde(default)]
    services: Vec<RegistryService>,
}

/// The Services of the registry file the proxies read.
pub fn registry_services(mesh: &Mesh) -> Result<Vec<RegistryService>> {
    let path = mesh.control_registry();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read the registry {}", path.display()))?;
    let file: RegistryFile = serde_norway::from_str(&text)
        .with_context(|| format!("the registry {}", path.display()))?;
    Ok(file.services)
}

/// Resolves a destination as the user wrote it, seen from namespace
/// `from`: `IP:PORT`, `SERVICE:PORT`, `SERVICE.NS[.svc[.cluster.local]]:PORT`,
/// `POD.NS:PORT` or `NS/POD:PORT`. Returns the address and how it was found.
pub fn resolve(
    dest: &str,
    from: &str,
    services: &[RegistryService],
    pods: &[PodInfo],
) -> Result<(SocketAddr, String), Failure> {
    if let Ok(addr) = dest.parse::<SocketAddr>() {
        return Ok((addr, format!("address {addr}")));
    }
    let usage = || {
        Failure::new(
            code::USAGE,
            format!(
                "destination {dest:?}: expected IP:PORT, SERVICE:PORT or SERVICE.NAMESPACE:PORT"
            ),
        )
        .hint("e.g. `mesh explain default/client web:8080`")
    };
    let (host, port) = dest.rsplit_once(':').ok_or_else(usage)?;
    let port: u16 = port.parse().map_err(|_| usage())?;
    if port == 0 {
        return Err(usage());
    }
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok((SocketAddr::new(ip, port), format!("address {ip}:{port}")));
    }
    let (name, ns) = if let Some((ns, pod)) = host.split_once('/') {
        (pod, ns)
    } else {
        let h = host
            .trim_end_matches('.')
            .trim_end_matches(".cluster.local")
            .trim_end_matches(".svc");
        match h.split_once('.') {
            Some((n, ns)) => (n, ns),
            None => (h, from),
        }
    };
    if !host.contains('/')
        && let Some(s) = services
            .iter()
            .find(|s| s.name == name && s.namespace == ns)
    {
        let ports: Vec<String> = s.ports.iter().map(|p| p.port.to_string()).collect();
        let note = if s.ports.iter().any(|p| p.port == port) {
            String::new()
        } else {
            format!(
                " (the Service has no port {port}; its ports: {})",
                ports.join(", ")
            )
        };
        return Ok((
            SocketAddr::new(s.vip, port),
            format!("Service {ns}/{name} (VIP {}){note}", s.vip),
        ));
    }
    if let Some(p) = pods.iter().find(|p| p.name == name && p.namespace == ns) {
        return Ok((
            SocketAddr::new(IpAddr::V4(p.ip), port),
            format!("pod {ns}/{name} ({})", p.ip),
        ));
    }
    let known: Vec<String> = services
        .iter()
        .map(|s| format!("{}.{}", s.name, s.namespace))
        .collect();
    Err(Failure::new(
        code::NOT_FOUND,
        format!("destination {dest:?}: no Service or pod {ns}/{name} in the mesh"),
    )
    .hint(format!(
        "Services: {}; or give an address, e.g. 10.77.2.2:8080",
        if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        }
    )))
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The proxy's answer, rendered: verdict first, then one section per layer.
/// The path's RTT line: the kernel's histogram of the pod's tunnels to
/// the endpoint (none on one node: no tunnel there).
fn path_rtt(rtt: &Value, same_node: bool) -> String {
    match serde_json::from_value::<mesh_core::admin::PathRtt>(rtt.clone()) {
        Ok(r) => format!(
            "p50 {}, p99 {} over {} samples; {} segments retransmitted, {} RTOs (kernel histogram of the tunnels)",
            crate::top::micros(Some(r.p50_us)),
            crate::top::micros(Some(r.p99_us)),
            r.samples,
            r.retransmits,
            r.rtos
        ),
        Err(_) if same_node => {
            "no tunnel: both pods are on this node (the proxy splices them, no fabric hop)".into()
        }
        Err(_) => "no sample yet (no tunnel from this pod to the endpoint has opened)".into(),
    }
}

pub fn render(x: &Value, asked: Option<&str>, paint: &Paint) -> String {
    let mut out = String::new();
    let label = |out: &mut String, l: &str, v: String| {
        out.push_str(&format!("{}  {v}\n", paint.bold(&format!("{l:<11}"))));
    };
    let more = |out: &mut String, l: &str, v: String| {
        out.push_str(&format!(
            "{:<11}  {}  {v}\n",
            "",
            paint.dim(&format!("{l:<9}"))
        ));
    };
    let route = &x["route"];
    let policy = &x["policy"];
    let denied = policy["allowed"] == Value::Bool(false);
    let refused = denied || route["kind"] == "unroutable" || x["enrolled"] == Value::Bool(false);
    let verdict = text(&x["verdict"]);
    label(
        &mut out,
        "VERDICT",
        paint.style(
            if refused {
                Style::RedBold
            } else {
                Style::Green
            },
            &verdict,
        ),
    );
    out.push('\n');

    // Source: the pod and the kernel's view of it.
    label(
        &mut out,
        "SOURCE",
        format!("{} on {}", text(&x["pod"]), text(&x["node"])),
    );
    more(&mut out, "identity", text(&x["identity"]));
    let enrolled = x["enrolled"] == Value::Bool(true);
    more(
        &mut out,
        "enrolled",
        if enrolled {
            let listeners: Vec<String> = x["listeners"]
                .as_array()
                .map(|l| l.iter().map(text).collect())
                .unwrap_or_default();
            format!(
                "yes, by the node proxy (netns cookie {}; listeners {})",
                text(&x["netns_cookie"]),
                if listeners.is_empty() {
                    "-".into()
                } else {
                    listeners.join(", ")
                }
            )
        } else {
            paint.red_bold("NO: the node proxy has not enrolled this pod")
        },
    );
    let kernel = &x["kernel"];
    label(
        &mut out,
        "KERNEL",
        format!(
            "redirection {}; netns in sm_enrolled: {}",
            text(&x["redirection_mode"]),
            if kernel["enrolled"] == Value::Bool(true) {
                paint.green("yes (connects are redirected to :15001)")
            } else {
                paint.red_bold("NO (connects leave unredirected or are refused)")
            }
        ),
    );
    if let Some(stats) = kernel["stats"].as_object() {
        let mut nonzero: Vec<String> = stats
            .iter()
            .filter(|(_, v)| v.as_u64().is_some_and(|n| n > 0))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        nonzero.sort();
        more(
            &mut out,
            "counters",
            if nonzero.is_empty() {
                "all zero".into()
            } else {
                nonzero.join(" ")
            },
        );
    }

    // Destination and route.
    label(
        &mut out,
        "DESTINATION",
        match asked {
            Some(a) => format!("{} = {a}", text(&x["destination"])),
            None => text(&x["destination"]),
        },
    );
    match text(&route["kind"]).as_str() {
        "mesh" => {
            let svc = text(&route["service"]);
            label(
                &mut out,
                "ROUTE",
                format!(
                    "mesh{}: endpoint {} at {} on {}",
                    if svc.is_empty() || svc == "unknown" {
                        String::new()
                    } else {
                        format!(" via Service {svc}")
                    },
                    text(&route["endpoint_pod"]),
                    text(&route["target"]),
                    text(&route["destination_node"]),
                ),
            );
            if let Some(eps) = route["endpoints"].as_array()
                && eps.len() > 1
            {
                more(
                    &mut out,
                    "endpoints",
                    format!(
                        "{} (picked per connection; this is one of them)",
                        eps.iter().map(text).collect::<Vec<_>>().join(", ")
                    ),
                );
            }
            more(&mut out, "tunnel", text(&route["tunnel"]));
            more(
                &mut out,
                "peer ID",
                format!(
                    "{} (checked in the TLS handshake)",
                    text(&route["expected_identity"])
                ),
            );
            let same_node = route["destination_node"] == x["node"];
            more(&mut out, "RTT", path_rtt(&x["rtt"], same_node));
        }
        "passthrough" => {
            label(
                &mut out,
                "ROUTE",
                paint.yellow(&format!("passthrough to {}", text(&route["target"]))),
            );
            more(&mut out, "why", text(&route["reason"]));
        }
        kind => {
            label(
                &mut out,
                "ROUTE",
                paint.red_bold(&format!(
                    "{}: {}",
                    if kind.is_empty() { "?" } else { kind },
                    text(&route["reason"])
                )),
            );
        }
    }

    // Policy.
    if policy.is_null() {
        label(
            &mut out,
            "POLICY",
            "not evaluated (policies apply to mesh destinations)".into(),
        );
    } else {
        let by = text(&policy["policy"]);
        let rule = text(&policy["rule"]);
        let head = match (denied, by.is_empty()) {
            (true, false) => paint.red_bold(&format!(
                "DENIED by {by}{}",
                if rule.is_empty() {
                    String::new()
                } else {
                    format!(", rule {rule}")
                }
            )),
            (true, true) => paint.red_bold("DENIED"),
            (false, false) => paint.green(&format!(
                "allowed by {by}{}",
                if rule.is_empty() {
                    String::new()
                } else {
                    format!(", rule {rule}")
                }
            )),
            (false, true) => paint.green("allowed"),
        };
        label(&mut out, "POLICY", head);
        more(&mut out, "reason", text(&policy["reason"]));
    }

    // Flows of this pod to this destination.
    let flows: Vec<ExplainFlow> = x["flows"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| serde_json::from_value(f.clone()).ok())
                .collect()
        })
        .unwrap_or_default();
    if flows.is_empty() {
        label(
            &mut out,
            "FLOWS",
            "none in the kernel's flow map for this destination".into(),
        );
    } else {
        label(
            &mut out,
            "FLOWS",
            format!("{} in the kernel's flow map:", flows.len()),
        );
        let mut t = Table::new(&["FLOW>", "APP SOCKET", "SENT>", "RECEIVED>", "AGE>", "STATE"]);
        for f in &flows {
            t.row([
                f.cookie.to_string(),
                f.app_socket.clone(),
                units::bytes(f.bytes_sent),
                units::bytes(f.bytes_received),
                units::age_ms(f.age_ms),
                if f.closed {
                    "closed".into()
                } else {
                    "open".into()
                },
            ]);
        }
        for line in t.render(paint).lines() {
            out.push_str(&format!("{:<11}  {line}\n", ""));
        }
    }
    out
}

/// The node whose flow map holds flow `cookie`.
fn node_of_flow(mesh: &Mesh, cookie: u64) -> Option<String> {
    mesh.state().nodes.iter().find_map(|n| {
        admin::get_json::<Vec<Flow>>(mesh, &n.name, "/flows")
            .ok()?
            .iter()
            .any(|f| f.cookie == cookie)
            .then(|| n.name.clone())
    })
}

fn ask(mesh: &Mesh, node: &str, query: &str) -> Result<Value> {
    admin::get_json(mesh, node, &format!("/explain?{query}")).map_err(|e| {
        if let Some(s) = e.downcast_ref::<admin::AdminStatus>()
            && s.status == 404
            && s.body.starts_with("no such endpoint")
        {
            return anyhow::anyhow!(
                "node {node}: its proxy has no /explain endpoint (an older mesh-proxy?); rebuild with `cargo build --bins` and recreate the mesh"
            );
        }
        e
    })
}

pub fn run(name: &str, args: &ExplainArgs) -> Result<()> {
    require_root("explain")?;
    let mesh = crate::local::open(name)?;
    let paint = Paint::stdout();
    let mut answers: Vec<(Value, Option<String>)> = Vec::new();
    match (&args.flow, &args.pod) {
        (Some(cookie), _) => {
            let node = node_of_flow(&mesh, *cookie).ok_or_else(|| {
                Failure::new(
                    code::NOT_FOUND,
                    format!("flow {cookie} is not in any node's flow map"),
                )
                .hint(format!(
                    "list the flows with `mesh{} top --once`",
                    name_flag(name)
                ))
            })?;
            answers.push((ask(&mesh, &node, &format!("flow={cookie}"))?, None));
        }
        (None, Some(pod)) => {
            let p = crate::local::pod(&mesh, pod)?.clone();
            match &args.dest {
                Some(dest) => {
                    let services = registry_services(&mesh)?;
                    let (addr, how) = resolve(dest, &p.namespace, &services, &mesh.state().pods)?;
                    let q = format!("pod={}&dst={}", encode(&p.key()), encode(&addr.to_string()));
                    answers.push((ask(&mesh, &p.node, &q)?, Some(format!("{dest} ({how})"))));
                }
                None => {
                    let mut flows: Vec<Flow> =
                        admin::get_json::<Vec<Flow>>(&mesh, &p.node, "/flows")?
                            .into_iter()
                            .filter(|f| f.source_workload == p.key())
                            .collect();
                    flows.sort_by_key(|f| f.age_ms);
                    if flows.is_empty() {
                        anyhow::bail!(
                            Failure::new(
                                code::NOT_FOUND,
                                format!("pod {} has no flows in the kernel's flow map", p.key())
                            )
                            .hint(format!(
                                "name a destination: `mesh{} explain {} web.default:8080`",
                                name_flag(name),
                                p.key()
                            ))
                        );
                    }
                    for f in flows.iter().take(3) {
                        answers.push((ask(&mesh, &p.node, &format!("flow={}", f.cookie))?, None));
                    }
                }
            }
        }
        (None, None) => anyhow::bail!(Failure::new(
            code::USAGE,
            "give a source pod (and a destination) or --flow ID"
        )),
    }
    if args.output.json() {
        let docs: Vec<&Value> = answers.iter().map(|(v, _)| v).collect();
        let doc = if docs.len() == 1 {
            docs[0].clone()
        } else {
            Value::from(docs.into_iter().cloned().collect::<Vec<_>>())
        };
        writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        let parts: Vec<String> = answers
            .iter()
            .map(|(v, asked)| render(v, asked.as_deref(), &paint))
            .collect();
        write!(std::io::stdout(), "{}", parts.join("\n"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<RegistryService> {
        vec![RegistryService {
            namespace: "default".into(),
            name: "web".into(),
            vip: "10.77.240.1".parse().unwrap(),
            ports: vec![RegistryPort {
                port: 8080,
                target_port: Some(8080),
            }],
        }]
    }

    fn pods() -> Vec<PodInfo> {
        vec![PodInfo {
            namespace: "other".into(),
            name: "iperf".into(),
            uid: "u".into(),
            node: "node-b".into(),
            service_account: "iperf".into(),
            labels: Default::default(),
            annotations: Default::default(),
            ip: "10.77.2.3".parse().unwrap(),
            ip6: None,
            netns: "x".into(),
            interface: "eth0".into(),
            veth: "v".into(),
            cgroup: "/c".into(),
        }]
    }

    #[test]
    fn destinations_resolve_like_kubernetes_dns() {
        let (s, p) = (services(), pods());
        let vip: SocketAddr = "10.77.240.1:8080".parse().unwrap();
        for d in [
            "web:8080",
            "web.default:8080",
            "web.default.svc:8080",
            "web.default.svc.cluster.local:8080",
        ] {
            assert_eq!(resolve(d, "default", &s, &p).unwrap().0, vip, "{d}");
        }
        assert_eq!(resolve("web.default:8080", "other", &s, &p).unwrap().0, vip);
        let e = resolve("web:8080", "other", &s, &p).unwrap_err();
        assert_eq!(e.code, code::NOT_FOUND);
        assert!(e.message.contains("other/web"), "{}", e.message);
        assert_eq!(
            resolve("iperf.other:5201", "default", &s, &p).unwrap().0,
            "10.77.2.3:5201".parse().unwrap()
        );
        assert_eq!(
            resolve("other/iperf:5201", "default", &s, &p).unwrap().0,
            "10.77.2.3:5201".parse().unwrap()
        );
        assert_eq!(
            resolve("[fd00::1]:80", "default", &s, &p).unwrap().0,
            "[fd00::1]:80".parse().unwrap()
        );
        assert_eq!(
            resolve("web", "default", &s, &p).unwrap_err().code,
            code::USAGE
        );
        assert_eq!(
            resolve("web:http", "default", &s, &p).unwrap_err().code,
            code::USAGE
        );
        assert!(
            resolve("web:9", "default", &s, &p)
                .unwrap()
                .1
                .contains("no port 9")
        );
        assert_eq!(encode("default/client"), "default%2Fclient");
    }

    #[test]
    fn the_rtt_line_says_why_there_is_none() {
        let none = serde_json::Value::Null;
        assert!(
            path_rtt(&none, true).contains("same node")
                || path_rtt(&none, true).contains("this node")
        );
        assert!(path_rtt(&none, false).starts_with("no sample yet"));
        let r = serde_json::json!({"tunnel": "1/out/10.0.0.2", "buckets": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4],
                                   "p50_us": 1448, "p99_us": 2028, "samples": 4, "retransmits": 3, "rtos": 1});
        assert_eq!(
            path_rtt(&r, false),
            "p50 1.4ms, p99 2.0ms over 4 samples; 3 segments retransmitted, 1 RTOs (kernel histogram of the tunnels)"
        );
    }

    #[test]
    fn explain_snapshot_denied() {
        let x = serde_json::json!({
            "verdict": "other/iperf -> 10.77.240.1:8080 is DENIED by the destination default/web: DENY policy default/deny-other-to-web rule 0 matched",
            "pod": "other/iperf", "node": "node-b",
            "identity": "spiffe://cluster.local/ns/other/sa/iperf",
            "enrolled": true, "netns_cookie": 4099, "listeners": ["127.0.0.1:15001"],
            "redirection_mode": "sockmap",
            "kernel": {"enrolled": true, "stats": {"connect_redirected": 2, "msg_redirected": 0}},
            "destination": "10.77.240.1:8080",
            "route": {"kind": "mesh", "service": "web.default.svc.cluster.local", "endpoint_pod": "default/web",
                      "endpoints": ["default/web", "default/web-2"], "target": "10.77.2.2:8080",
                      "tunnel": "HBONE (HTTP/2 CONNECT 10.77.2.2:8080) over mTLS to 10.77.2.2:15008",
                      "expected_identity": "spiffe://cluster.local/ns/default/sa/web", "destination_node": "node-b"},
            "policy": {"allowed": false, "policy": "default/deny-other-to-web", "rule": 0,
                       "reason": "DENY policy default/deny-other-to-web rule 0 matched"},
            "flows": [{"cookie": 77, "app_socket": "10.77.2.3:41000", "bytes_sent": 0, "bytes_received": 0, "closed": true, "age_ms": 1200}],
            "rtt": {"tunnel": "4099/out/10.77.2.2", "buckets": [0, 0, 0, 0, 0, 0, 12], "p50_us": 90, "p99_us": 127,
                    "samples": 12, "retransmits": 0, "rtos": 0}
        });
        let got = render(
            &x,
            Some("web.default:8080 (Service default/web (VIP 10.77.240.1))"),
            &Paint::off(),
        );
        let want = "\
VERDICT      other/iperf -> 10.77.240.1:8080 is DENIED by the destination default/web: DENY policy default/deny-other-to-web rule 0 matched

SOURCE       other/iperf on node-b
             identity   spiffe://cluster.local/ns/other/sa/iperf
             enrolled   yes, by the node proxy (netns cookie 4099; listeners 127.0.0.1:15001)
KERNEL       redirection sockmap; netns in sm_enrolled: yes (connects are redirected to :15001)
             counters   connect_redirected=2
DESTINATION  10.77.240.1:8080 = web.default:8080 (Service default/web (VIP 10.77.240.1))
ROUTE        mesh via Service web.default.svc.cluster.local: endpoint default/web at 10.77.2.2:8080 on node-b
             endpoints  default/web, default/web-2 (picked per connection; this is one of them)
             tunnel     HBONE (HTTP/2 CONNECT 10.77.2.2:8080) over mTLS to 10.77.2.2:15008
             peer ID    spiffe://cluster.local/ns/default/sa/web (checked in the TLS handshake)
             RTT        p50 90us, p99 127us over 12 samples; 0 segments retransmitted, 0 RTOs (kernel histogram of the tunnels)
POLICY       DENIED by default/deny-other-to-web, rule 0
             reason     DENY policy default/deny-other-to-web rule 0 matched
FLOWS        1 in the kernel's flow map:
             FLOW  APP SOCKET       SENT  RECEIVED   AGE  STATE
               77  10.77.2.3:41000   0 B       0 B  1.2s  closed
";
        assert_eq!(got, want, "got:\n{got}");
    }
}
