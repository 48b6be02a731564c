//! `mesh certs POD`: the pod's X.509-SVID as its node proxy holds it
//! (`GET /certs` and `GET /workloads`): SPIFFE ID, serial, validity, next
//! renewal, errors. The admin API shows the leaf only; the issuing root is
//! the CA's trust bundle, whose path is shown, not parsed.

use anyhow::Result;
use serde::Serialize;
use std::io::Write as _;

use crate::admin::{self, CertState, Workloads};
use crate::cli::CertsArgs;
use crate::failure::{Failure, code, require_root};
use crate::paint::Paint;
use crate::units;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodCert {
    pub pod: String,
    pub node: String,
    pub identity: String,
    pub trust_bundle: String,
    #[serde(flatten)]
    pub cert: CertState,
}

pub fn render(c: &PodCert, now: u64, paint: &Paint) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        out.push_str(&format!("{}  {v}\n", paint.bold(&format!("{k:<13}"))));
    };
    line("POD", format!("{} on {}", c.pod, c.node));
    line("SPIFFE ID", c.identity.clone());
    line(
        "STATUS",
        if c.cert.valid {
            paint.green("valid")
        } else {
            paint.red_bold("NOT VALID (the pod's mTLS connections fail until it is renewed)")
        },
    );
    line(
        "SERIAL",
        c.cert.serial.clone().unwrap_or_else(|| "-".into()),
    );
    line(
        "NOT BEFORE",
        c.cert
            .not_before
            .map(|t| format!("{} ({})", units::timestamp(t), units::relative(t, now)))
            .unwrap_or_else(|| "-".into()),
    );
    line(
        "NOT AFTER",
        c.cert
            .not_after
            .map(|t| format!("{} ({})", units::timestamp(t), units::relative(t, now)))
            .unwrap_or_else(|| "-".into()),
    );
    if let (Some(a), Some(b)) = (c.cert.not_before, c.cert.not_after) {
        line("LIFETIME", units::age_ms(b.saturating_sub(a) * 1000));
    }
    line(
        "NEXT RENEWAL",
        format!(
            "{} ({})",
            units::timestamp(c.cert.next_refresh),
            units::relative(c.cert.next_refresh, now)
        ),
    );
    line(
        "ERRORS",
        match &c.cert.last_error {
            None => format!(
                "none ({} consecutive failures)",
                c.cert.consecutive_failures
            ),
            Some(e) => paint.red(&format!(
                "{e} ({} consecutive failures)",
                c.cert.consecutive_failures
            )),
        },
    );
    line(
        "CHAIN",
        format!(
            "leaf above, issued by the mesh CA; roots in {} (the admin API shows the leaf only)",
            c.trust_bundle
        ),
    );
    out
}

pub fn run(name: &str, args: &CertsArgs) -> Result<()> {
    require_root("certs")?;
    let mesh = crate::local::open(name)?;
    let p = crate::local::pod(&mesh, &args.pod)?.clone();
    let w: Workloads = admin::get_json(&mesh, &p.node, "/workloads")?;
    let key = p.key();
    let identity = w
        .pods
        .iter()
        .find(|w| w.pod == key)
        .map(|w| w.identity.clone())
        .filter(|i| !i.is_empty())
        .ok_or_else(|| {
            Failure::new(
                code::FAILURE,
                format!("node {}: its proxy does not serve pod {key}", p.node),
            )
            .hint("check `mesh status`")
        })?;
    let certs: Vec<CertState> = admin::get_json(&mesh, &p.node, "/certs")?;
    let cert = certs
        .into_iter()
        .find(|c| c.identity == identity)
        .ok_or_else(|| {
            Failure::new(
                code::FAILURE,
                format!(
                    "node {}: no certificate for {identity} (pod {key}); is the pod enrolled?",
                    p.node
                ),
            )
            .hint("check `mesh status` and the proxy log")
        })?;
    let pc = PodCert {
        pod: key,
        node: p.node.clone(),
        identity,
        trust_bundle: mesh
            .state_dir()
            .join("control/ca/trust-bundle.pem")
            .display()
            .to_string(),
        cert,
    };
    if args.output.json() {
        writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&pc)?)?;
    } else {
        write!(
            std::io::stdout(),
            "{}",
            render(&pc, units::now_unix(), &Paint::stdout())
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_snapshot() {
        let now = 1_764_058_320;
        let c = PodCert {
            pod: "default/client".into(),
            node: "node-a".into(),
            identity: "spiffe://cluster.local/ns/default/sa/client".into(),
            trust_bundle: "/run/sockmesh/demo/control/ca/trust-bundle.pem".into(),
            cert: CertState {
                identity: "spiffe://cluster.local/ns/default/sa/client".into(),
                serial: Some("3a:9f:01".into()),
                not_before: Some(now - 300),
                not_after: Some(now - 300 + 86_400),
                next_refresh: now + 43_000,
                last_error: None,
                consecutive_failures: 0,
                valid: true,
            },
        };
        let got = render(&c, now, &Paint::off());
        let want = "\
POD            default/client on node-a
SPIFFE ID      spiffe://cluster.local/ns/default/sa/client
STATUS         valid
SERIAL         3a:9f:01
NOT BEFORE     2025-11-25 08:07:00 UTC (5m00s ago)
NOT AFTER      2025-11-26 08:07:00 UTC (in 23h55m)
LIFETIME       1d00h
NEXT RENEWAL   2025-11-25 20:08:40 UTC (in 11h56m)
ERRORS         none (0 consecutive failures)
CHAIN          leaf above, issued by the mesh CA; roots in /run/sockmesh/demo/control/ca/trust-bundle.pem (the admin API shows the leaf only)
";
        assert_eq!(got, want, "got:\n{got}");
    }
}
