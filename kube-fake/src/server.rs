//! HTTP: the accept loop (which can go away and come back), routing,
//! the verbs, watches and TokenReview.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use crate::discovery::{self, ResourceType};
use crate::select::{FieldSelector, LabelSelector};
use crate::store::{ApiError, Event, EventType, ObjKey, not_found};
use crate::{Shared, TokenSpec};

type Body = BoxBody<Bytes, std::io::Error>;

/// Largest request body accepted.
const MAX_BODY: usize = 4 << 20;

pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr) {
    let mut listener = Some(listener);
    let mut up = shared.up.subscribe();
    loop {
        match listener.take() {
            Some(l) if *up.borrow() => {
                tokio::select! {
                    accepted = l.accept() => {
                        if let Ok((io, _)) = accepted {
                            tokio::spawn(connection(shared.clone(), io));
                        }
                        listener = Some(l);
                    }
                    _ = up.changed() => {
                        if *up.borrow() {
                            listener = Some(l);
                        }
                        // Down: the listener is dropped, connections refused.
                    }
                }
            }
            _ => {
                // Down: wait to come back, then rebind the same address.
                while !*up.borrow_and_update() {
                    if up.changed().await.is_err() {
                        return;
                    }
                }
                for _ in 0..100 {
                    match TcpListener::bind(addr).await {
                        Ok(l) => {
                            listener = Some(l);
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(%addr, error = %e, "rebind");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        }
    }
}

async fn connection(shared: Arc<Shared>, io: tokio::net::TcpStream) {
    let mut kill = shared.kill.subscribe();
    kill.mark_unchanged();
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::select! {
        _ = conn => {}
        _ = kill.changed() => {} // dropped: the socket closes mid-stream
    }
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap_or_else(|_| {
            Response::new(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
        })
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request path names.
struct Target {
    rt: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let types = shared.store().types.clone();
    // Discovery and version.
    let discovered = match segs.as_slice() {
        ["version"] => Some(
            json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0-kube-fake", "platform": "linux/amd64"}),
        ),
        ["api"] => Some(discovery::core_versions()),
        ["apis"] => Some(discovery::group_list(&types)),
        ["api", "v1"] => discovery::resource_list(&types, "", "v1"),
        ["apis", g] => discovery::group(&types, g),
        ["apis", g, v] => discovery::resource_list(&types, g, v),
        _ => None,
    };
    if let Some(doc) = discovered {
        shared.count("get", "discovery");
        return json_response(200, &doc);
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return error(&ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource: {path}"),
            ));
        }
    };
    let (ns, plural, name) = match rest {
        ["namespaces", n] => (None, "namespaces", Some(*n)),
        [p] => (None, *p, None),
        [p, n] if *p != "namespaces" => (None, *p, Some(*n)),
        ["namespaces", ns, p] => (Some(*ns), *p, None),
        ["namespaces", ns, p, n] | ["namespaces", ns, p, n, _] => (Some(*ns), *p, Some(*n)),
        _ => {
            return error(&ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource: {path}"),
            ));
        }
    };
    let Some(rt) = types
        .iter()
        .find(|t| t.group == group && t.version == version && t.plural == plural)
        .cloned()
    else {
        return error(&ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource: {path}"),
        ));
    };
    let target = Target {
        namespace: if rt.namespaced {
            ns.map(str::to_owned)
        } else {
            None
        },
        name: name.map(str::to_owned),
        rt,
    };
    let q = query(&req);
    let resource = target.rt.resource_name();
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    let manager = q
        .get("fieldManager")
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let key = |t: &Target| -> ObjKey {
        (
            t.namespace.clone().unwrap_or_default(),
            t.name.clone().unwrap_or_default(),
        )
    };
    let verb = match (&method, target.name.is_some()) {
        (&Method::GET, false) if is_true(q.get("watch")) => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "",
    };
    if shared.denied(verb, &resource) {
        let scope = match &target.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        return error(&ApiError::new(
            403,
            "Forbidden",
            format!(
                "{resource} is forbidden: User \"system:anonymous\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
                target.rt.plural, target.rt.group
            ),
        ));
    }
    let result = match (&method, target.name.is_some()) {
        (&Method::GET, false) if is_true(q.get("watch")) => {
            shared.count("watch", &resource);
            return watch(shared, target, &q);
        }
        (&Method::GET, false) => {
            shared.count("list", &resource);
            list(&shared, &target, &q)
        }
        (&Method::GET, true) => {
            shared.count("get", &resource);
            let store = shared.store();
            store
                .get(
                    &(target.rt.group.clone(), target.rt.plural.clone()),
                    &key(&target),
                )
                .cloned()
                .map(|v| (200, v))
                .ok_or_else(|| not_found(&target.rt, &key(&target).1))
        }
        (&Method::POST, false) => {
            shared.count("create", &resource);
            let obj = parse_body(&body);
            match obj {
                Err(e) => Err(e),
                Ok(obj) if target.rt.plural == "tokenreviews" => {
                    Ok((201, token_review(&shared, &obj)))
                }
                Ok(obj) => {
                    let ns = target.namespace.clone().unwrap_or_default();
                    let res = shared.store().create(&target.rt, &ns, obj, &manager);
                    res.map(|(v, ev)| {
                        shared.publish(Some(ev));
                        (201, v)
                    })
                }
            }
        }
        (&Method::PUT, true) => {
            shared.count("update", &resource);
            parse_body(&body).and_then(|obj| {
                let res = shared
                    .store()
                    .replace(&target.rt, &key(&target), obj, &manager);
                res.map(|(v, ev)| {
                    shared.publish(ev);
                    (200, v)
                })
            })
        }
        (&Method::PATCH, true) => {
            shared.count("patch", &resource);
            let ct = content_type.split(';').next().unwrap_or("").trim();
            match ct {
                "application/apply-patch+yaml" => {
                    let obj = serde_yaml::from_slice::<Value>(&body)
                        .map_err(|e| ApiError::new(400, "BadRequest", format!("apply patch: {e}")));
                    obj.and_then(|obj| {
                        if !q.contains_key("fieldManager") {
                            return Err(ApiError::new(422, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"));
                        }
                        let res = shared.store().apply(&target.rt, &key(&target), obj, &manager, is_true(q.get("force")));
                        res.map(|(v, ev)| {
                            let code = if ev.as_ref().is_some_and(|e| e.kind == EventType::Added) { 201 } else { 200 };
                            shared.publish(ev);
                            (code, v)
                        })
                    })
                }
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    parse_body(&body).and_then(|patch| {
                        let res =
                            shared
                                .store()
                                .merge_patch(&target.rt, &key(&target), &patch, &manager);
                        res.map(|(v, ev)| {
                            shared.publish(ev);
                            (200, v)
                        })
                    })
                }
                other => Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format: {other}"),
                )),
            }
        }
        (&Method::DELETE, true) => {
            shared.count("delete", &resource);
            let res = shared.store().delete(&target.rt, &key(&target));
            res.map(|(v, ev)| {
                shared.publish(Some(ev));
                (200, v)
            })
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    };
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error(&e),
    }
}

fn is_true(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("1" | "true"))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError::new(413, "RequestEntityTooLarge", format!("request body: {e}")))
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(400, "BadRequest", format!("body: {e}")))
}

fn selectors(q: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let bad = |e: crate::select::SelectorError| ApiError::new(400, "BadRequest", e.to_string());
    Ok((
        LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
            .map_err(bad)?,
        FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))
            .map_err(bad)?,
    ))
}

fn list(
    shared: &Shared,
    t: &Target,
    q: &HashMap<String, String>,
) -> Result<(u16, Value), ApiError> {
    let (labels, fields) = selectors(q)?;
    let store = shared.store();
    let items: Vec<Value> = store
        .list(
            &(t.rt.group.clone(), t.rt.plural.clone()),
            t.namespace.as_deref(),
        )
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .collect();
    Ok((
        200,
        json!({
            "kind": format!("{}List", t.rt.kind),
            "apiVersion": t.rt.api_version(),
            "metadata": {"resourceVersion": store.rv.to_string()},
            "items": items,
        }),
    ))
}

fn event_json(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn gone_event(rv: &str) -> Bytes {
    event_json(
        "ERROR",
        &ApiError::new(410, "Expired", format!("too old resource version: {rv}")).status(),
    )
}

fn watch(shared: Arc<Shared>, t: Target, q: &HashMap<String, String>) -> Response<Body> {
    let (labels, fields) = match selectors(q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(256);
    let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let response = Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|_| json_response(500, &json!({})));
    let from = q.get("resourceVersion").cloned().unwrap_or_default();
    let bookmarks = is_true(q.get("allowWatchBookmarks"));
    let initial = is_true(q.get("sendInitialEvents"));
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let ty = (t.rt.group.clone(), t.rt.plural.clone());
    let ns = t.namespace.clone();
    let name = t.name.clone();
    let matches = move |o: &Value| {
        let in_ns = ns
            .as_deref()
            .is_none_or(|n| o.pointer("/metadata/namespace").and_then(Value::as_str) == Some(n));
        let named = name
            .as_deref()
            .is_none_or(|n| o.pointer("/metadata/name").and_then(Value::as_str) == Some(n));
        in_ns && named && labels.matches(o) && fields.matches(o)
    };
    let expired = shared.take_expired_watch();
    let mut cut = shared.cut.subscribe();
    cut.mark_unchanged();
    // Under the store lock: subscribe, then read what to replay, so no
    // event falls between the two.
    let (mut live, replay, mut last_rv, gone) = {
        let store = shared.store();
        let live = shared.events.subscribe();
        let current = store.rv;
        let mut replay: Vec<(String, Value)> = Vec::new();
        let mut gone = expired;
        match from.parse::<u64>() {
            _ if expired => {}
            Ok(n) if n > 0 && !initial => {
                if n < store.compacted {
                    gone = true;
                } else {
                    for ev in store.log.iter().filter(|e| e.rv > n && e.ty == ty) {
                        if let Some(item) = filtered(ev, &matches) {
                            replay.push(item);
                        }
                    }
                }
            }
            _ => {
                for o in store.list(&ty, None).into_iter().filter(|o| matches(o)) {
                    replay.push(("ADDED".into(), o));
                }
                if initial {
                    replay.push((
                        "BOOKMARK".into(),
                        json!({"kind": t.rt.kind, "apiVersion": t.rt.api_version(), "metadata": {"resourceVersion": current.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}}),
                    ));
                }
            }
        }
        (live, replay, current, gone)
    };
    let kind = t.rt.kind.clone();
    let api_version = t.rt.api_version();
    let interval = shared.options.bookmark_interval;
    tokio::spawn(async move {
        let send = |b: Bytes| tx.send(Ok(Frame::data(b)));
        if gone {
            let _ = send(gone_event(&from)).await;
            return;
        }
        for (k, o) in replay {
            if send(event_json(&k, &o)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return, // clean end: the client re-watches
                _ = cut.changed() => {
                    let _ = tx.send(Err(std::io::Error::other("watch cut by the test"))).await;
                    return;
                }
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": last_rv.to_string()}});
                    if send(event_json("BOOKMARK", &bm)).await.is_err() {
                        return;
                    }
                }
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= last_rv {
                            continue;
                        }
                        last_rv = ev.rv;
                        if ev.ty != ty {
                            continue;
                        }
                        if let Some((k, o)) = filtered(&ev, &matches)
                            && send(event_json(&k, &o)).await.is_err()
                        {
                            return;
                        }
                    }
                    // Too slow: the watch ends, the client re-watches from its
                    // last version (replayed from the window).
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    response
}

/// The event as a watch with this filter sees it.
fn filtered(ev: &Event, matches: &impl Fn(&Value) -> bool) -> Option<(String, Value)> {
    let now = matches(&ev.object);
    let before = ev.old.as_ref().is_some_and(matches);
    let kind = match (ev.kind, before, now) {
        (EventType::Modified, false, true) => EventType::Added,
        (EventType::Modified, true, false) => EventType::Deleted,
        (EventType::Modified, false, false) => return None,
        (k, _, true) => k,
        (_, _, false) => return None,
    };
    Some((kind.as_str().to_owned(), ev.object.clone()))
}

/// The API server's default audience, for reviews that name none.
const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

fn token_review(shared: &Shared, review: &Value) -> Value {
    let token = review
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or("");
    let wanted: Vec<String> = review
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec![API_AUDIENCE.to_owned()]);
    let spec: Option<TokenSpec> = shared
        .tokens
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(token)
        .cloned();
    let refuse = |msg: String| {
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": {"audiences": wanted},
            "status": {"authenticated": false, "user": {}, "error": msg},
        })
    };
    let Some(spec) = spec else {
        return refuse(
            "[invalid bearer token, square/go-jose: error in cryptographic primitive]".into(),
        );
    };
    if spec.expires <= SystemTime::now() {
        return refuse("[invalid bearer token, service account token has expired]".into());
    }
    let audiences: Vec<String> = wanted
        .iter()
        .filter(|a| spec.audiences.contains(a))
        .cloned()
        .collect();
    if audiences.is_empty() {
        return refuse(format!(
            "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
            spec.audiences, wanted
        ));
    }
    if let Some((pod, uid)) = &spec.pod {
        let store = shared.store();
        let current = store.get(
            &(String::new(), "pods".into()),
            &(spec.namespace.clone(), pod.clone()),
        );
        match current
            .and_then(|p| p.pointer("/metadata/uid"))
            .and_then(Value::as_str)
        {
            None => return refuse(format!("[invalid bearer token, pods \"{pod}\" not found]")),
            Some(u) if u != uid => {
                return refuse(format!(
                    "[invalid bearer token, pod \"{pod}\" UID ({u}) does not match the UID in the token ({uid})]"
                ));
            }
            Some(_) => {}
        }
    }
    let mut extra = serde_json::Map::new();
    if let Some((pod, uid)) = &spec.pod {
        extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
        extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
    }
    if let Some((node, uid)) = &spec.node {
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            json!([node]),
        );
        extra.insert("authentication.kubernetes.io/node-uid".into(), json!([uid]));
    }
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"audiences": wanted},
        "status": {
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{}:{}", spec.namespace, spec.service_account),
                "uid": format!("sa-uid-{}-{}", spec.namespace, spec.service_account),
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", spec.namespace), "system:authenticated"],
                "extra": extra,
            },
            "audiences": audiences,
        },
    })
}
