//! `mesh top`: the flows of every node's kernel flow map (through each
//! proxy's `GET /flows`), with byte rates from the difference between two
//! samples, sorted, redrawn in place on a terminal.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use mesh_local::Mesh;
use serde::Serialize;

use crate::admin::{self, Flow};
use crate::cli::{SortKey, TopArgs};
use crate::failure::{Failure, code, require_root};
use crate::paint::{Paint, Style};
use crate::table::Table;
use crate::units;

/// Every node's flows at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub flows: Vec<(String, Flow)>,
    /// Nodes that did not answer, with why.
    pub errors: Vec<String>,
}

/// A flow with its rates over the last interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub node: String,
    #[serde(flatten)]
    pub flow: Flow,
    /// Bytes per second since the previous sample (`None`: first seen).
    pub rate_sent: Option<f64>,
    pub rate_received: Option<f64>,
}

impl Row {
    fn bytes(&self) -> u64 {
        self.flow
            .bytes_sent
            .saturating_add(self.flow.bytes_received)
    }
    fn rate(&self) -> f64 {
        self.rate_sent.unwrap_or(0.0) + self.rate_received.unwrap_or(0.0)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub flows: usize,
    pub open: usize,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rate_sent: f64,
    pub rate_received: f64,
}

pub fn sample(mesh: &Mesh) -> Sample {
    let mut flows = Vec::new();
    let mut errors = Vec::new();
    for n in &mesh.state().nodes {
        match admin::get_json::<Vec<Flow>>(mesh, &n.name, "/flows") {
            Ok(f) => flows.extend(f.into_iter().map(|f| (n.name.clone(), f))),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    Sample {
        at: Instant::now(),
        flows,
        errors,
    }
}

/// Rows of `cur`, with rates against `prev` (same node and cookie).
pub fn rows(prev: Option<&Sample>, cur: &Sample) -> Vec<Row> {
    let before: HashMap<(&str, u64), &Flow> = prev
        .map(|p| {
            p.flows
                .iter()
                .map(|(n, f)| ((n.as_str(), f.cookie), f))
                .collect()
        })
        .unwrap_or_default();
    let secs = prev
        .map(|p| cur.at.saturating_duration_since(p.at).as_secs_f64())
        .unwrap_or(0.0);
    cur.flows
        .iter()
        .map(|(node, f)| {
            let rate =
                |now: u64, then: u64| (secs > 0.0).then(|| now.saturating_sub(then) as f64 / secs);
            let (rs, rr) = match (prev, before.get(&(node.as_str(), f.cookie))) {
                (Some(_), Some(b)) => (
                    rate(f.bytes_sent, b.bytes_sent),
                    rate(f.bytes_received, b.bytes_received),
                ),
                // New since the last sample: all its bytes are recent if
                // it is younger than the interval.
                (Some(_), None) if (f.age_ms as f64) < secs * 1000.0 => {
                    (rate(f.bytes_sent, 0), rate(f.bytes_received, 0))
                }
                _ => (None, None),
            };
            Row {
                node: node.clone(),
                flow: f.clone(),
                rate_sent: rs,
                rate_received: rr,
            }
        })
        .collect()
}

pub fn sort(rows: &mut [Row], key: SortKey) {
    rows.sort_by(|a, b| {
        let primary = match key {
            SortKey::Rate => b.rate().total_cmp(&a.rate()),
            SortKey::Bytes => b.bytes().cmp(&a.bytes()),
            SortKey::Age => a.flow.age_ms.cmp(&b.flow.age_ms),
        };
        primary
            .then(b.bytes().cmp(&a.bytes()))
            .then(a.flow.cookie.cmp(&b.flow.cookie))
    });
}

pub fn totals(rows: &[Row]) -> Totals {
    let mut t = Totals {
        flows: rows.len(),
        ..Totals::default()
    };
    for r in rows {
        t.open += usize::from(!r.flow.closed);
        t.bytes_sent += r.flow.bytes_sent;
        t.bytes_received += r.flow.bytes_received;
        t.rate_sent += r.rate_sent.unwrap_or(0.0);
        t.rate_received += r.rate_received.unwrap_or(0.0);
    }
    t
}

/// `ns/default/sa/client` for `spiffe://cluster.local/ns/default/sa/client`.
pub fn short_id(id: &str) -> String {
    match id.strip_prefix("spiffe://").and_then(|r| r.split_once('/')) {
        Some((_, path)) => path.to_owned(),
        None if id.is_empty() || id == "unknown" => "-".into(),
        None => id.to_owned(),
    }
}

fn workload(w: &str) -> String {
    if w.is_empty() || w == "/" || w.starts_with("unknown") {
        "-".into()
    } else {
        w.to_owned()
    }
}

/// The flow table and its totals line.
pub fn render(rows: &[Row], paint: &Paint) -> String {
    let t = totals(rows);
    let mut table = Table::new(&[
        "FLOW>",
        "NODE",
        "SOURCE",
        "DESTINATION",
        "ORIGINAL DST",
        "SOURCE ID",
        "DESTINATION ID",
        "SECURITY",
        "SENT>",
        "RECEIVED>",
        "SENT/s>",
        "RECV/s>",
        "AGE>",
        "STATE",
    ]);
    for r in rows {
        let f = &r.flow;
        let security = match f.security.as_str() {
            "mutual_tls" => ("mTLS".to_owned(), Style::Green),
            "" | "unknown" => ("-".to_owned(), Style::Plain),
            s => (s.to_owned(), Style::Yellow),
        };
        table.styled([
            (f.cookie.to_string(), Style::Plain),
            (r.node.clone(), Style::Plain),
            (workload(&f.source_workload), Style::Plain),
            (workload(&f.destination_workload), Style::Plain),
            (f.original_dst.clone(), Style::Plain),
            (short_id(&f.source_principal), Style::Dim),
            (short_id(&f.destination_principal), Style::Dim),
            security,
            (units::bytes(f.bytes_sent), Style::Plain),
            (units::bytes(f.bytes_received), Style::Plain),
            (units::rate(r.rate_sent), Style::Cyan),
            (units::rate(r.rate_received), Style::Cyan),
            (units::age_ms(f.age_ms), Style::Plain),
            if f.closed {
                ("closed".into(), Style::Dim)
            } else {
                ("open".into(), Style::Green)
            },
        ]);
    }
    let mut out = if table.is_empty() {
        "no flows in the kernel's flow maps yet: try `mesh exec default/client -- curl -s http://web:8080/`\n"
            .to_owned()
    } else {
        table.render(paint)
    };
    out.push_str(&format!(
        "{} flows ({} open); sent {} ({}), received {} ({})\n",
        t.flows,
        t.open,
        units::bytes(t.bytes_sent),
        units::rate(Some(t.rate_sent)),
        units::bytes(t.bytes_received),
        units::rate(Some(t.rate_received)),
    ));
    out
}

/// Sleeps `d` unless `stop` is raised first; false when stopped.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
    !stop.load(Ordering::Relaxed)
}

pub fn run(name: &str, args: &TopArgs) -> Result<()> {
    require_root("top")?;
    if !(args.interval > 0.0 && args.interval <= 3600.0) {
        anyhow::bail!(Failure::new(
            code::USAGE,
            format!(
                "--interval {}: must be more than 0 and at most 3600 seconds",
                args.interval
            )
        ));
    }
    let mesh = crate::local::open(name)?;
    let interval = Duration::from_secs_f64(args.interval);
    let tty = std::io::stdout().is_terminal();
    let iterations = match (args.once, args.iterations) {
        (true, _) => 1,
        (false, Some(n)) => n,
        (false, None) if tty => u64::MAX,
        (false, None) => 1,
    };
    let show_closed = args.all || iterations == 1;
    let live = tty && !args.output.json() && iterations > 1;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let paint = Paint::stdout();

    let mut prev = sample(&mesh);
    if prev.flows.is_empty() && prev.errors.len() == mesh.state().nodes.len() {
        anyhow::bail!("no node proxy answered: {}", prev.errors.join("; "));
    }
    let mut out = std::io::stdout();
    for i in 0..iterations {
        if !nap(interval, &stop) {
            break;
        }
        let cur = sample(&mesh);
        let mut r = rows(Some(&prev), &cur);
        if !show_closed {
            r.retain(|r| !r.flow.closed || r.rate() > 0.0);
        }
        sort(&mut r, args.sort);
        if args.output.json() {
            let doc = serde_json::json!({
                "mesh": name,
                "interval_s": args.interval,
                "flows": r,
                "totals": totals(&r),
                "errors": cur.errors,
            });
            writeln!(out, "{doc}")?;
        } else {
            let mut frame = String::new();
            if live {
                frame.push_str("\x1b[H\x1b[2J");
                let sort = match args.sort {
                    SortKey::Rate => "rate",
                    SortKey::Bytes => "bytes",
                    SortKey::Age => "age",
                };
                frame.push_str(&paint.bold(&format!(
                    "mesh top: {name}, every {:.1}s, sorted by {sort}, refresh {} (Ctrl-C quits)",
                    args.interval,
                    i + 1
                )));
                frame.push_str("\n\n");
            }
            frame.push_str(&render(&r, &paint));
            for e in &cur.errors {
                frame.push_str(&format!("{} {e}\n", paint.red("!")));
            }
            out.write_all(frame.as_bytes())?;
        }
        out.flush()?;
        prev = cur;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(cookie: u64, sent: u64, received: u64, age_ms: u64, closed: bool) -> Flow {
        Flow {
            cookie,
            source_workload: "default/client".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/client".into(),
            app_socket: "10.77.1.2:40000".into(),
            original_dst: "10.77.240.1:8080".into(),
            destination_workload: "default/web".into(),
            destination_principal: "spiffe://cluster.local/ns/default/sa/web".into(),
            destination_service: "web.default.svc.cluster.local".into(),
            security: "mutual_tls".into(),
            bytes_sent: sent,
            bytes_received: received,
            age_ms,
            closed,
            srtt_us: 40,
            direction: "outbound".into(),
            destination_pod: Some("default/web-1".into()),
        }
    }

    #[test]
    fn rates_come_from_the_difference_between_samples() {
        let t0 = Instant::now();
        let prev = Sample {
            at: t0,
            flows: vec![("node-a".into(), flow(1, 1000, 0, 5000, false))],
            errors: vec![],
        };
        let cur = Sample {
            at: t0 + Duration::from_secs(2),
            flows: vec![
                ("node-a".into(), flow(1, 5000, 2048, 7000, false)),
                ("node-a".into(), flow(2, 100, 100, 500, true)),
                ("node-b".into(), flow(3, 10, 10, 90_000, false)),
            ],
            errors: vec![],
        };
        let mut r = rows(Some(&prev), &cur);
        assert_eq!(r[0].rate_sent, Some(2000.0));
        assert_eq!(r[0].rate_received, Some(1024.0));
        assert_eq!(
            r[1].rate_sent,
            Some(50.0),
            "new and young: all its bytes are recent"
        );
        assert_eq!(r[2].rate_sent, None, "old but unseen: unknown");
        sort(&mut r, SortKey::Age);
        assert_eq!(
            r.iter().map(|r| r.flow.cookie).collect::<Vec<_>>(),
            [2, 1, 3]
        );
        sort(&mut r, SortKey::Bytes);
        assert_eq!(
            r.iter().map(|r| r.flow.cookie).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        sort(&mut r, SortKey::Rate);
        assert_eq!(
            r.iter().map(|r| r.flow.cookie).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let t = totals(&r);
        assert_eq!((t.flows, t.open, t.bytes_sent), (3, 2, 5110));
    }

    #[test]
    fn top_table_snapshot() {
        let mut passthrough = flow(9, 0, 0, 61_000, true);
        passthrough.destination_workload = "/".into();
        passthrough.destination_principal = String::new();
        passthrough.original_dst = "192.0.2.1:443".into();
        passthrough.security = "none".into();
        let r = vec![
            Row {
                node: "node-a".into(),
                flow: flow(4113, 3 << 20, 1536, 4200, false),
                rate_sent: Some(1048576.0),
                rate_received: Some(512.0),
            },
            Row {
                node: "node-b".into(),
                flow: passthrough,
                rate_sent: None,
                rate_received: None,
            },
        ];
        let got = render(&r, &Paint::off());
        let want = "\
FLOW  NODE    SOURCE          DESTINATION  ORIGINAL DST      SOURCE ID             DESTINATION ID     SECURITY      SENT  RECEIVED      SENT/s   RECV/s    AGE  STATE
4113  node-a  default/client  default/web  10.77.240.1:8080  ns/default/sa/client  ns/default/sa/web  mTLS      3.00 MiB  1.50 KiB  1.00 MiB/s  512 B/s   4.2s  open
   9  node-b  default/client  -            192.0.2.1:443     ns/default/sa/client  -                  none           0 B       0 B           -        -  1m01s  closed
2 flows (1 open); sent 3.00 MiB (1.00 MiB/s), received 1.50 KiB (512 B/s)
";
        assert_eq!(got, want, "got:\n{got}");
        assert!(render(&[], &Paint::off()).starts_with("no flows"));
    }
}
