//! The node proxy's HTTP/1 side doors: admin (localhost:15000), Prometheus
//! metrics (:15020) and readiness (:15021). They run on the control runtime,
//! never on the data-plane workers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::drain;
use crate::metrics::exposition::Format;

/// What the side doors show. Implemented by the running proxy.
pub trait AdminState: Send + Sync + 'static {
    fn config_dump(&self) -> serde_json::Value;
    fn workloads(&self) -> serde_json::Value;
    fn certs(&self) -> serde_json::Value;
    fn flows(&self) -> serde_json::Value;
    fn stats(&self) -> serde_json::Value;
    /// Replaces the log filter (`RUST_LOG` syntax).
    fn set_log_level(&self, filter: &str) -> Result<(), BadFilter>;
    fn log_level(&self) -> String;
    /// `Err(reason)` while not ready.
    fn ready(&self) -> Result<(), NotReady>;
    /// The metrics in `format` (negotiated from the scraper's `Accept`),
    /// and the Content-Type of the body returned: normally
    /// `metrics::exposition::encode(registry, format)` and
    /// `format.content_type()`.
    fn metrics(&self, format: Format) -> (String, &'static str);
    /// Why a pod's connection to a destination goes where it goes (or is
    /// refused): `query` is the raw query string (`pod=NS/NAME&dst=IP:PORT`
    /// or `flow=COOKIE`). `Err((status, message))` for bad requests.
    fn explain(&self, query: &str) -> Result<serde_json::Value, (StatusCode, String)>;
}

/// Why a log filter was refused (the filter parser's or the reload's
/// error).
pub type BadFilter = Box<dyn std::error::Error + Send + Sync>;

/// What readiness still waits for, one entry per pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct NotReady(pub Vec<String>);

/// Which door a listener is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    Admin,
    Metrics,
    Readiness,
}

const HELP: &str = "sockmesh node proxy admin\n\
GET  /config_dump        configuration and data-path mode\n\
GET  /workloads          pods this node serves (enrolled, listeners, identity)\n\
GET  /certs              certificate state per identity\n\
GET  /flows              live flows from the kernel flow map\n\
GET  /stats              kernel event counters\n\
GET  /explain?pod=NS/NAME&dst=IP:PORT   route, kernel state and policy decision for a connection\n\
GET  /explain?flow=COOKIE               the same for a live flow of the kernel flow map\n\
GET  /logging            current log filter\n\
POST /logging?level=F    set the log filter (RUST_LOG syntax), e.g. level=debug,mesh_proxy=trace\n";

fn text(status: StatusCode, body: impl Into<Bytes>, content_type: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn json(v: serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    text(StatusCode::OK, body, "application/json")
}

/// The value of `key` in a query string, percent-decoded.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        // A form's `+` is a space; an invalid escape stays as it is.
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
}

/// All the request's `Accept` values, joined as one list.
fn accept(headers: &http::HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// The metrics door's answer: the format the scraper asked for, labelled
/// with the Content-Type of the body the state actually returned.
fn metrics(state: &dyn AdminState, headers: &http::HeaderMap) -> Response<Full<Bytes>> {
    let format = Format::negotiate(accept(headers).as_deref());
    let (body, content_type) = state.metrics(format);
    let mut r = text(StatusCode::OK, body, content_type);
    r.headers_mut()
        .insert(http::header::VARY, http::HeaderValue::from_static("Accept"));
    r
}

/// Routes one request. Public for tests.
pub fn route(
    door: Door,
    state: &dyn AdminState,
    method: &Method,
    path: &str,
    query: &str,
    headers: &http::HeaderMap,
) -> Response<Full<Bytes>> {
    match (door, method, path) {
        (Door::Readiness, &Method::GET, "/healthz/ready") => match state.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n", "text/plain"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                "text/plain",
            ),
        },
        (Door::Metrics, &Method::GET, "/metrics" | "/stats/prometheus") => metrics(state, headers),
        (Door::Admin, &Method::GET, "/") => text(StatusCode::OK, HELP, "text/plain"),
        (Door::Admin, &Method::GET, "/config_dump") => json(state.config_dump()),
        (Door::Admin, &Method::GET, "/workloads") => json(state.workloads()),
        (Door::Admin, &Method::GET, "/certs") => json(state.certs()),
        (Door::Admin, &Method::GET, "/flows") => json(state.flows()),
        (Door::Admin, &Method::GET, "/stats") => json(state.stats()),
        (Door::Admin, &Method::GET, "/explain") => match state.explain(query) {
            Ok(v) => json(v),
            Err((status, msg)) => text(status, format!("{msg}\n"), "text/plain"),
        },
        (Door::Admin, &Method::GET, "/logging") => text(
            StatusCode::OK,
            format!("{}\n", state.log_level()),
            "text/plain",
        ),
        (Door::Admin, &Method::POST, "/logging") => match query_param(query, "level") {
            None => text(
                StatusCode::BAD_REQUEST,
                "missing ?level=FILTER (RUST_LOG syntax, e.g. level=debug)\n",
                "text/plain",
            ),
            Some(level) => match state.set_log_level(&level) {
                Ok(()) => text(
                    StatusCode::OK,
                    format!("log filter set to {level}\n"),
                    "text/plain",
                ),
                Err(e) => text(
                    StatusCode::BAD_REQUEST,
                    format!("bad log filter {level:?}: {e}\n"),
                    "text/plain",
                ),
            },
        },
        _ => text(
            StatusCode::NOT_FOUND,
            format!(
                "no such endpoint: {method} {path}\n\n{}",
                if door == Door::Admin { HELP } else { "" }
            ),
            "text/plain",
        ),
    }
}

/// Serves one door until drained. Each connection gets a read timeout so a
/// stuck client cannot pin a task forever.
pub async fn serve(
    listener: TcpListener,
    door: Door,
    state: Arc<dyn AdminState>,
    mut drain: drain::Watch,
) {
    loop {
        let accepted = tokio::select! {
            _ = drain.signaled() => return,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(?door, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let query = req.uri().query().unwrap_or("").to_owned();
                    Ok::<_, Infallible>(route(
                        door,
                        state.as_ref(),
                        req.method(),
                        req.uri().path(),
                        &query,
                        req.headers(),
                    ))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(60), conn).await {
                tracing::debug!(?door, error = %e, "admin connection timed out");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    static NO_HEADERS: std::sync::LazyLock<http::HeaderMap> =
        std::sync::LazyLock::new(http::HeaderMap::new);

    #[derive(Default)]
    struct Fake {
        level: Mutex<String>,
        ready: bool,
    }
    impl AdminState for Fake {
        fn config_dump(&self) -> serde_json::Value {
            serde_json::json!({"node": "n1"})
        }
        fn workloads(&self) -> serde_json::Value {
            serde_json::json!([])
        }
        fn certs(&self) -> serde_json::Value {
            serde_json::json!([])
        }
        fn flows(&self) -> serde_json::Value {
            serde_json::json!([])
        }
        fn stats(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn set_log_level(&self, f: &str) -> Result<(), BadFilter> {
            if f.contains(' ') {
                return Err("spaces".into());
            }
            *self.level.lock().unwrap() = f.into();
            Ok(())
        }
        fn log_level(&self) -> String {
            self.level.lock().unwrap().clone()
        }
        fn ready(&self) -> Result<(), NotReady> {
            if self.ready {
                Ok(())
            } else {
                Err(NotReady(vec!["pod default/web: no certificate yet".into()]))
            }
        }
        fn metrics(&self, format: Format) -> (String, &'static str) {
            let body = match format {
                Format::Text => "# TYPE x_total counter\nx_total 1\n",
                Format::OpenMetrics => "# TYPE x counter\nx_total 1\n# EOF\n",
            };
            (body.into(), format.content_type())
        }
        fn explain(&self, q: &str) -> Result<serde_json::Value, (StatusCode, String)> {
            query_param(q, "pod")
                .map(|p| serde_json::json!({"pod": p}))
                .ok_or((StatusCode::BAD_REQUEST, "need pod=".into()))
        }
    }

    #[test]
    fn explain_decodes_its_query() {
        let s = Fake::default();
        let r = route(
            Door::Admin,
            &s,
            &Method::GET,
            "/explain",
            "pod=default%2Fclient&dst=10.0.0.1%3A80",
            &NO_HEADERS,
        );
        assert_eq!(r.status(), 200);
        assert_eq!(
            route(Door::Admin, &s, &Method::GET, "/explain", "", &NO_HEADERS).status(),
            400
        );
        assert_eq!(query_param("a=1&pod=x%2Fy", "pod").as_deref(), Some("x/y"));
        assert_eq!(query_param("pod=%zz", "pod").as_deref(), Some("%zz"));
        assert_eq!(query_param("pod=%2", "pod").as_deref(), Some("%2"));
        assert_eq!(
            query_param("dst=10.0.0.1%3A80&level=a+b", "dst").as_deref(),
            Some("10.0.0.1:80"),
            "an escaped colon"
        );
        assert_eq!(query_param("level=a+b", "level").as_deref(), Some("a b"));
    }

    /// The status `door` answers a GET of `path` with.
    fn get(door: Door, s: &Fake, path: &str) -> u16 {
        route(door, s, &Method::GET, path, "", &NO_HEADERS)
            .status()
            .as_u16()
    }

    #[test]
    fn doors_route_only_their_own_endpoints() {
        let s = Fake::default();
        assert_eq!(get(Door::Admin, &s, "/config_dump"), 200);
        assert_eq!(get(Door::Metrics, &s, "/config_dump"), 404);
        assert_eq!(get(Door::Metrics, &s, "/metrics"), 200);
        assert_eq!(get(Door::Readiness, &s, "/healthz/ready"), 503);
        let ready = Fake {
            ready: true,
            ..Fake::default()
        };
        assert_eq!(get(Door::Readiness, &ready, "/healthz/ready"), 200);
    }

    #[test]
    fn log_level_is_switchable_and_bad_filters_name_the_value() {
        let s = Fake::default();
        let set = |query: &str| {
            route(
                Door::Admin,
                &s,
                &Method::POST,
                "/logging",
                query,
                &NO_HEADERS,
            )
            .status()
            .as_u16()
        };
        assert_eq!(set("level=debug"), 200);
        assert_eq!(s.log_level(), "debug");
        assert_eq!(set(""), 400);
        assert_eq!(set("level=a b"), 400);
    }

    #[test]
    fn the_metrics_door_serves_the_format_the_scraper_accepts() {
        let s = Fake::default();
        let get = |accept: &[&str]| {
            let mut h = http::HeaderMap::new();
            for a in accept {
                h.append(
                    http::header::ACCEPT,
                    http::HeaderValue::from_str(a).unwrap(),
                );
            }
            let r = route(Door::Metrics, &s, &Method::GET, "/metrics", "", &h);
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()[http::header::VARY], "Accept");
            r.headers()[http::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(get(&[]), "text/plain; version=0.0.4; charset=utf-8");
        assert_eq!(get(&["*/*"]), "text/plain; version=0.0.4; charset=utf-8");
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            get(&[prometheus]),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        // Several Accept header lines make one list.
        assert_eq!(
            get(&["text/plain;q=0.2", "application/openmetrics-text;q=0.9"]),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
    }
}
