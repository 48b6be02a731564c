//! `mesh top`: the flows of every node's kernel flow map (through each
//! proxy's `GET /flows`), with byte rates from the difference between two
//! samples and the round-trip time of the tunnels that carry them (the
//! kernel's histograms), sorted, redrawn in place on a terminal; then the
//! same RTT per workload pair.

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
use mesh_core::admin::PathRtt;

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
    fn rtt_p99(&self) -> Option<u64> {
        self.flow.rtt.as_ref().map(|r| r.p99_us)
    }
}

/// The RTT of one workload pair, as one reporter sees it: every tunnel
/// of its flows merged once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pair {
    pub direction: String,
    pub source_workload: String,
    pub destination_workload: String,
    pub flows: usize,
    pub rtt: PathRtt,
}

/// Workload pairs of `rows` with an RTT, slowest (p99) first.
pub fn pairs(rows: &[Row]) -> Vec<Pair> {
    let mut by: std::collections::BTreeMap<(&str, &str, &str), Vec<&PathRtt>> = Default::default();
    for r in rows {
        if let Some(rtt) = &r.flow.rtt {
            by.entry((
                r.flow.direction.as_str(),
                r.flow.source_workload.as_str(),
                r.flow.destination_workload.as_str(),
            ))
            .or_default()
            .push(rtt);
        }
    }
    let mut out: Vec<Pair> = by
        .into_iter()
        .filter_map(|((d, s, t), rtts)| {
            Some(Pair {
                direction: d.to_owned(),
                source_workload: s.to_owned(),
                destination_workload: t.to_owned(),
                flows: rtts.len(),
                rtt: PathRtt::merge(rtts)?,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        b.rtt
            .p99_us
            .cmp(&a.rtt.p99_us)
            .then(a.source_workload.cmp(&b.source_workload))
            .then(a.destination_workload.cmp(&b.destination_workload))
    });
    out
}

/// `85us`, `1.2ms`, `3.40s`; `-` when unknown.
pub fn micros(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 1000 => format!("{us}us"),
        Some(us) if us < 1_000_000 => format!("{:.1}ms", us as f64 / 1000.0),
        Some(us) => format!("{:.2}s", us as f64 / 1e6),
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
            // Slowest first; flows without a tunnel RTT last.
            SortKey::Rtt => b.rtt_p99().cmp(&a.rtt_p99()),
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
        "RTT p50>",
        "RTT p99>",
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
            (micros(f.rtt.as_ref().map(|r| r.p50_us)), Style::Plain),
            (micros(f.rtt.as_ref().map(|r| r.p99_us)), Style::Plain),
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
    let pairs = pairs(rows);
    if !pairs.is_empty() {
        let mut table = Table::new(&[
            "SOURCE",
            "DESTINATION",
            "REPORTER",
            "FLOWS>",
            "RTT p50>",
            "RTT p99>",
            "SAMPLES>",
            "RETRANS>",
        ]);
        for p in &pairs {
            let reporter = if p.direction == "inbound" {
                "destination"
            } else {
                "source"
            };
            table.styled([
                (workload(&p.source_workload), Style::Plain),
                (workload(&p.destination_workload), Style::Plain),
                (reporter.to_owned(), Style::Dim),
                (p.flows.to_string(), Style::Plain),
                (micros(Some(p.rtt.p50_us)), Style::Cyan),
                (micros(Some(p.rtt.p99_us)), Style::Cyan),
                (p.rtt.samples.to_string(), Style::Dim),
                (
                    p.rtt.retransmits.to_string(),
                    if p.rtt.retransmits > 0 {
                        Style::Yellow
                    } else {
                        Style::Plain
                    },
                ),
            ]);
        }
        out.push('\n');
        out.push_str(&table.render(paint));
    }
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
                "pairs": pairs(&r),
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
                    SortKey::Rtt => "RTT p99",
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
            rtt: None,
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

    fn rtt(tunnel: &str, us: &[u64], retransmits: u64) -> Option<PathRtt> {
        let mut b = vec![0u64; 32];
        for &v in us {
            b[63 - v.max(1).leading_zeros() as usize] += 1;
        }
        PathRtt::from_buckets(tunnel.into(), &b, retransmits, 0)
    }

    #[test]
    fn sort_by_rtt_puts_the_slow_pair_first_and_pairs_merge_each_tunnel_once() {
        let mut fast = flow(1, 10, 10, 100, false);
        fast.rtt = rtt("7/out/10.77.2.2", &[100; 10], 0);
        let mut fast2 = flow(2, 10, 10, 100, false);
        fast2.rtt = fast.rtt.clone(); // same tunnel
        let mut slow = flow(3, 10, 10, 100, false);
        slow.destination_workload = "other/iperf".into();
        slow.rtt = rtt("7/out/10.77.2.3", &[20_000; 10], 5);
        let none = flow(4, 1 << 30, 10, 100, false);
        let mut r: Vec<Row> = [fast, fast2, slow, none]
            .into_iter()
            .map(|f| Row {
                node: "node-a".into(),
                flow: f,
                rate_sent: None,
                rate_received: None,
            })
            .collect();
        sort(&mut r, SortKey::Rtt);
        assert_eq!(
            r.iter().map(|r| r.flow.cookie).collect::<Vec<_>>(),
            [3, 1, 2, 4]
        );
        let p = pairs(&r);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].destination_workload, "other/iperf");
        assert_eq!(p[0].rtt.retransmits, 5);
        assert_eq!(
            (p[1].flows, p[1].rtt.samples),
            (2, 10),
            "one tunnel, counted once"
        );
        assert!((64..128).contains(&p[1].rtt.p50_us), "{:?}", p[1].rtt);
        let text = render(&r, &Paint::off());
        assert!(text.contains("REPORTER"), "{text}");
        assert_eq!(micros(Some(85)), "85us");
        assert_eq!(micros(Some(1200)), "1.2ms");
        assert_eq!(micros(None), "-");
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
                flow: Flow {
                    rtt: rtt("7/out/10.77.2.2", &[100; 10], 2),
                    ..flow(4113, 3 << 20, 1536, 4200, false)
                },
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
FLOW  NODE    SOURCE          DESTINATION  ORIGINAL DST      SOURCE ID             DESTINATION ID     SECURITY      SENT  RECEIVED      SENT/s   RECV/s    AGE  RTT p50  RTT p99  STATE
4113  node-a  default/client  default/web  10.77.240.1:8080  ns/default/sa/client  ns/default/sa/web  mTLS      3.00 MiB  1.50 KiB  1.00 MiB/s  512 B/s   4.2s     91us    127us  open
   9  node-b  default/client  -            192.0.2.1:443     ns/default/sa/client  -                  none           0 B       0 B           -        -  1m01s        -        -  closed
2 flows (1 open); sent 3.00 MiB (1.00 MiB/s), received 1.50 KiB (512 B/s)

SOURCE          DESTINATION  REPORTER  FLOWS  RTT p50  RTT p99  SAMPLES  RETRANS
default/client  default/web  source        1     91us    127us       10        2
";
        assert_eq!(got, want, "got:\n{got}");
        assert!(render(&[], &Paint::off()).starts_with("no flows"));
    }
}
