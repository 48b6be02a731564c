//! Objects, the global resourceVersion, the event window and field
//! ownership (server-side apply).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::discovery::ResourceType;

/// Where an object lives: (group, plural) and (namespace, name);
/// cluster-scoped objects have an empty namespace.
pub type TypeKey = (String, String);
pub type ObjKey = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub ty: TypeKey,
    pub kind: EventType,
    /// The object after the change (before it, for DELETED).
    pub object: Value,
    /// The object before the change (selectors: moving out of a selector
    /// is a DELETED for that watch, moving in an ADDED).
    pub old: Option<Value>,
}

/// A refused write, shaped like the API server's `Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// A field path: `["metadata", "annotations", "sockmesh.io/status"]`.
type Path = Vec<String>;

#[derive(Debug, Clone, Default)]
struct Owner {
    operation: &'static str,
    paths: BTreeSet<Path>,
}

#[derive(Debug)]
pub struct Store {
    pub rv: u64,
    pub types: Vec<ResourceType>,
    objects: HashMap<TypeKey, BTreeMap<ObjKey, Value>>,
    owners: HashMap<(TypeKey, ObjKey), BTreeMap<String, Owner>>,
    /// Recent events, oldest first.
    pub log: VecDeque<Arc<Event>>,
    /// How many events are kept: older resourceVersions get 410 Gone.
    pub window: usize,
    /// Watches from a resourceVersion below this get 410 Gone.
    pub compacted: u64,
}

/// Paths the server owns: never part of a manager's fields.
fn server_owned(path: &[String]) -> bool {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    matches!(
        p.as_slice(),
        ["apiVersion"]
            | ["kind"]
            | ["metadata", "name"]
            | ["metadata", "namespace"]
            | ["metadata", "uid"]
            | ["metadata", "resourceVersion"]
            | ["metadata", "generation"]
            | ["metadata", "creationTimestamp"]
            | ["metadata", "managedFields", ..]
    )
}

/// Leaf paths of an object: maps are walked, anything else is a leaf.
fn leaf_paths(v: &Value, prefix: &mut Path, out: &mut BTreeSet<Path>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                prefix.push(k.clone());
                if !server_owned(prefix) {
                    leaf_paths(child, prefix, out);
                }
                prefix.pop();
            }
        }
        _ if !prefix.is_empty() => {
            out.insert(prefix.clone());
        }
        _ => {}
    }
}

fn paths_of(v: &Value) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    leaf_paths(v, &mut Vec::new(), &mut out);
    out
}

fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn remove(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = &mut *v;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
    // Drop maps the removal left empty (as apply does).
    for depth in (1..path.len()).rev() {
        let parent = &path[..depth];
        if get(v, parent)
            .and_then(Value::as_object)
            .is_some_and(Map::is_empty)
        {
            let (last, up) = parent.split_last().unwrap_or((&parent[0], &[]));
            let mut cur = &mut *v;
            for k in up {
                match cur.get_mut(k) {
                    Some(next) => cur = next,
                    None => return,
                }
            }
            if let Some(m) = cur.as_object_mut() {
                m.remove(last);
            }
        }
    }
}

/// Maps merge key by key; anything else (lists too) is replaced.
fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// JSON merge patch (RFC 7386): `null` deletes.
pub fn merge_patch(into: &mut Value, patch: &Value) {
    match (into.as_object_mut(), patch) {
        (Some(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(k);
                } else if let Some(slot) = a.get_mut(k).filter(|s| s.is_object() && v.is_object()) {
                    merge_patch(slot, v);
                } else {
                    let mut fresh = Value::Object(Map::new());
                    if v.is_object() {
                        merge_patch(&mut fresh, v);
                    } else {
                        fresh = v.clone();
                    }
                    a.insert(k.clone(), fresh);
                }
            }
        }
        (_, v) => *into = v.clone(),
    }
}

fn fields_v1(paths: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for k in p {
            let entry = cur
                .entry(format!("f:{k}"))
                .or_insert_with(|| Value::Object(Map::new()));
            match entry.as_object_mut() {
                Some(m) => cur = m,
                None => break,
            }
        }
    }
    Value::Object(root)
}

fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn name_of(v: &Value) -> &str {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

impl Store {
    pub fn new(window: usize) -> Self {
        Store {
            rv: 1,
            types: crate::discovery::builtin(),
            objects: HashMap::new(),
            owners: HashMap::new(),
            log: VecDeque::new(),
            window,
            compacted: 0,
        }
    }

    pub fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    pub fn get(&self, ty: &TypeKey, key: &ObjKey) -> Option<&Value> {
        self.objects.get(ty).and_then(|m| m.get(key))
    }

    /// Every object of a type (in `ns`, or all namespaces).
    pub fn list(&self, ty: &TypeKey, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .get(ty)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|((n, _), _)| ns.is_none_or(|want| n == want))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Drops every kept event: any watch from an older resourceVersion gets 410.
    pub fn compact(&mut self) {
        self.log.clear();
        self.compacted = self.rv;
    }

    fn record(
        &mut self,
        ty: &TypeKey,
        kind: EventType,
        object: Value,
        old: Option<Value>,
    ) -> Arc<Event> {
        let ev = Arc::new(Event {
            rv: self.rv,
            ty: ty.clone(),
            kind,
            object,
            old,
        });
        self.log.push_back(ev.clone());
        while self.log.len() > self.window {
            if let Some(old) = self.log.pop_front() {
                self.compacted = old.rv;
            }
        }
        ev
    }

    fn render_managed(&self, ty: &TypeKey, key: &ObjKey, obj: &mut Value, api_version: &str) {
        let entries: Vec<Value> = self
            .owners
            .get(&(ty.clone(), key.clone()))
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, o)| !o.paths.is_empty())
            .map(|(manager, o)| {
                json!({
                    "manager": manager,
                    "operation": o.operation,
                    "apiVersion": api_version,
                    "time": now(),
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(&o.paths),
                })
            })
            .collect();
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }

    fn stamp(rt: &ResourceType, obj: &mut Value, ns: &str, rv: u64) -> Result<(), ApiError> {
        let Some(o) = obj.as_object_mut() else {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the body is not a JSON object",
            ));
        };
        o.insert("apiVersion".into(), rt.api_version().into());
        o.insert("kind".into(), rt.kind.clone().into());
        let meta = o
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .ok_or_else(|| ApiError::new(400, "BadRequest", "metadata is not an object"))?;
        if rt.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(n) if n != ns => {
                    return Err(ApiError::new(
                        400,
                        "BadRequest",
                        format!(
                            "the namespace of the object ({n}) does not match the namespace on the request ({ns})"
                        ),
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), ns.into());
                }
            }
        }
        meta.insert("resourceVersion".into(), rv.to_string().into());
        Ok(())
    }

    /// POST: creates; 409 AlreadyExists if the name is taken.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        manager: &str,
    ) -> Result<(Value, Arc<Event>), ApiError> {
        let ty = (rt.group.clone(), rt.plural.clone());
        if name_of(&obj).is_empty() {
            let generate = obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .map(str::to_owned);
            match generate {
                Some(prefix) => {
                    let suffix: String = new_uid()
                        .chars()
                        .filter(char::is_ascii_alphanumeric)
                        .take(5)
                        .collect();
                    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.insert("name".into(), format!("{prefix}{suffix}").into());
                    }
                }
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!("{} is invalid: metadata.name: Required value", rt.kind),
                    ));
                }
            }
        }
        let key = (
            if rt.namespaced {
                ns.to_owned()
            } else {
                String::new()
            },
            name_of(&obj).to_owned(),
        );
        if self.get(&ty, &key).is_some() {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", rt.resource_name(), key.1),
            ));
        }
        self.rv += 1;
        Self::stamp(rt, &mut obj, ns, self.rv)?;
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("uid".into(), new_uid().into());
            m.insert("creationTimestamp".into(), now().into());
        }
        let mut owners = BTreeMap::new();
        owners.insert(
            manager.to_owned(),
            Owner {
                operation: "Update",
                paths: paths_of(&obj),
            },
        );
        self.owners.insert((ty.clone(), key.clone()), owners);
        self.render_managed(&ty, &key, &mut obj, &rt.api_version());
        self.objects
            .entry(ty.clone())
            .or_default()
            .insert(key, obj.clone());
        if ty.1 == "customresourcedefinitions" {
            for t in crate::discovery::from_crd(&obj) {
                if self.find_type(&t.group, &t.version, &t.plural).is_none() {
                    self.types.push(t);
                }
            }
        }
        let ev = self.record(&ty, EventType::Added, obj.clone(), None);
        Ok((obj, ev))
    }

    /// Stores `new` in place of `old` with an Update by `manager`: it owns
    /// what it changed, taken from the others.
    fn update_owned(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
        old: Value,
        mut new: Value,
        manager: &str,
        operation: &'static str,
    ) -> Result<(Value, Option<Arc<Event>>), ApiError> {
        let ty = (rt.group.clone(), rt.plural.clone());
        // Server-owned metadata stays.
        for f in ["uid", "creationTimestamp"] {
            if let Some(v) = old.pointer(&format!("/metadata/{f}")).cloned()
                && let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut)
            {
                m.insert(f.into(), v);
            }
        }
        let mut cmp_old = old.clone();
        let mut cmp_new = new.clone();
        for v in [&mut cmp_old, &mut cmp_new] {
            if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
                m.remove("managedFields");
            }
        }
        if cmp_old == cmp_new {
            return Ok((old, None));
        }
        let new_paths = paths_of(&cmp_new);
        let changed: BTreeSet<Path> = new_paths
            .iter()
            .filter(|p| get(&cmp_old, p) != get(&cmp_new, p))
            .cloned()
            .collect();
        let owners = self.owners.entry((ty.clone(), key.clone())).or_default();
        for (m, o) in owners.iter_mut() {
            o.paths.retain(|p| new_paths.contains(p));
            if m != manager {
                o.paths.retain(|p| !changed.contains(p));
            }
        }
        let mine = owners.entry(manager.to_owned()).or_insert_with(|| Owner {
            operation,
            paths: BTreeSet::new(),
        });
        mine.operation = operation;
        mine.paths.extend(changed);
        owners.retain(|_, o| !o.paths.is_empty());
        self.rv += 1;
        Self::stamp(rt, &mut new, &key.0, self.rv)?;
        self.render_managed(&ty, key, &mut new, &rt.api_version());
        self.objects
            .entry(ty.clone())
            .or_default()
            .insert(key.clone(), new.clone());
        let ev = self.record(&ty, EventType::Modified, new.clone(), Some(old));
        Ok((new, Some(ev)))
    }

    /// PUT: replaces; 409 Conflict on a stale resourceVersion.
    pub fn replace(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
        obj: Value,
        manager: &str,
    ) -> Result<(Value, Option<Arc<Event>>), ApiError> {
        let ty = (rt.group.clone(), rt.plural.clone());
        let Some(old) = self.get(&ty, key).cloned() else {
            return Err(not_found(rt, &key.1));
        };
        if name_of(&obj) != key.1 {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            ));
        }
        if let Some(want) = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(want)
                != old
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    rt.resource_name(),
                    key.1
                ),
            ));
        }
        self.update_owned(rt, key, old, obj, manager, "Update")
    }

    /// PATCH with a JSON merge patch (strategic merge patches too: lists
    /// are replaced, not merged by key).
    pub fn merge_patch(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
        patch: &Value,
        manager: &str,
    ) -> Result<(Value, Option<Arc<Event>>), ApiError> {
        let ty = (rt.group.clone(), rt.plural.clone());
        let Some(old) = self.get(&ty, key).cloned() else {
            return Err(not_found(rt, &key.1));
        };
        let mut new = old.clone();
        merge_patch(&mut new, patch);
        self.update_owned(rt, key, old, new, manager, "Update")
    }

    /// Server-side apply. Creates when absent; a field owned by another
    /// manager with a different value is a 409 unless `force`.
    pub fn apply(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
        applied: Value,
        manager: &str,
        force: bool,
    ) -> Result<(Value, Option<Arc<Event>>), ApiError> {
        let ty = (rt.group.clone(), rt.plural.clone());
        if !name_of(&applied).is_empty() && name_of(&applied) != key.1 {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL",
            ));
        }
        let new_paths = paths_of(&applied);
        let Some(old) = self.get(&ty, key).cloned() else {
            let mut obj = applied;
            if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("name".into(), key.1.clone().into());
            }
            let (created, ev) = self.create(rt, &key.0, obj, manager)?;
            if let Some(o) = self.owners.get_mut(&(ty.clone(), key.clone())) {
                o.clear();
                o.insert(
                    manager.to_owned(),
                    Owner {
                        operation: "Apply",
                        paths: new_paths,
                    },
                );
            }
            let mut created = created;
            self.render_managed(&ty, key, &mut created, &rt.api_version());
            if let Some(m) = self.objects.get_mut(&ty) {
                m.insert(key.clone(), created.clone());
            }
            return Ok((created, Some(ev)));
        };
        let owners = self
            .owners
            .entry((ty.clone(), key.clone()))
            .or_default()
            .clone();
        let mut conflicts = Vec::new();
        for p in &new_paths {
            for (m, o) in &owners {
                if m != manager && o.paths.contains(p) && get(&old, p) != get(&applied, p) {
                    conflicts.push(format!("conflict with \"{m}\": .{}", p.join(".")));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    conflicts.join("; ")
                ),
            ));
        }
        let mut new = old.clone();
        let previously: BTreeSet<Path> = owners
            .get(manager)
            .map(|o| o.paths.clone())
            .unwrap_or_default();
        for p in previously.difference(&new_paths) {
            let others = owners
                .iter()
                .any(|(m, o)| m != manager && o.paths.contains(p));
            if !others {
                remove(&mut new, p);
            }
        }
        merge(&mut new, &applied);
        let mut cmp_old = old.clone();
        let mut cmp_new = new.clone();
        for v in [&mut cmp_old, &mut cmp_new] {
            if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
                m.remove("managedFields");
            }
        }
        let owners = self.owners.entry((ty.clone(), key.clone())).or_default();
        let ownership_same = owners
            .get(manager)
            .is_some_and(|o| o.paths == new_paths && o.operation == "Apply");
        for (m, o) in owners.iter_mut() {
            if m != manager && force {
                o.paths
                    .retain(|p| !new_paths.contains(p) || get(&old, p) == get(&applied, p));
            }
        }
        owners.insert(
            manager.to_owned(),
            Owner {
                operation: "Apply",
                paths: new_paths,
            },
        );
        owners.retain(|_, o| !o.paths.is_empty());
        if cmp_old == cmp_new && ownership_same {
            // A no-op apply writes nothing: no new resourceVersion, no event.
            return Ok((old, None));
        }
        self.rv += 1;
        Self::stamp(rt, &mut new, &key.0, self.rv)?;
        self.render_managed(&ty, key, &mut new, &rt.api_version());
        self.objects
            .entry(ty.clone())
            .or_default()
            .insert(key.clone(), new.clone());
        let ev = self.record(&ty, EventType::Modified, new.clone(), Some(old));
        Ok((new, Some(ev)))
    }

    pub fn delete(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
    ) -> Result<(Value, Arc<Event>), ApiError> {
        let ty = (rt.group.clone(), rt.plural.clone());
        let Some(mut obj) = self.objects.get_mut(&ty).and_then(|m| m.remove(key)) else {
            return Err(not_found(rt, &key.1));
        };
        self.owners.remove(&(ty.clone(), key.clone()));
        self.rv += 1;
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), self.rv.to_string().into());
        }
        let ev = self.record(&ty, EventType::Deleted, obj.clone(), None);
        Ok((obj, ev))
    }
}

pub fn not_found(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", rt.resource_name()),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pods() -> ResourceType {
        ResourceType::new("", "v1", "Pod", "pods", true)
    }

    fn key() -> ObjKey {
        ("default".into(), "web".into())
    }

    #[test]
    fn apply_creates_records_its_manager_and_a_noop_writes_nothing() {
        let mut s = Store::new(100);
        let a = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "annotations": {"x": "1"}}});
        let (obj, ev) = s.apply(&pods(), &key(), a.clone(), "mgr", false).unwrap();
        assert!(ev.is_some());
        assert_eq!(obj["metadata"]["managedFields"][0]["manager"], "mgr");
        assert_eq!(obj["metadata"]["managedFields"][0]["operation"], "Apply");
        assert_eq!(
            obj["metadata"]["managedFields"][0]["fieldsV1"],
            json!({"f:metadata": {"f:annotations": {"f:x": {}}}})
        );
        let rv = s.rv;
        let (_, ev) = s.apply(&pods(), &key(), a, "mgr", false).unwrap();
        assert!(ev.is_none());
        assert_eq!(s.rv, rv);
    }

    #[test]
    fn apply_conflicts_with_another_manager_unless_forced_and_drops_fields_it_no_longer_sets() {
        let mut s = Store::new(100);
        let pod = json!({"metadata": {"name": "web", "annotations": {"x": "1"}}, "spec": {"nodeName": "n1"}});
        s.create(&pods(), "default", pod, "kubectl").unwrap();
        let mine = json!({"metadata": {"name": "web", "annotations": {"x": "2", "mine": "a"}}});
        let err = s
            .apply(&pods(), &key(), mine.clone(), "me", false)
            .unwrap_err();
        assert_eq!(err.code, 409);
        assert!(
            err.message.contains("\"kubectl\": .metadata.annotations.x"),
            "{}",
            err.message
        );
        let (obj, _) = s.apply(&pods(), &key(), mine, "me", true).unwrap();
        assert_eq!(obj["metadata"]["annotations"]["x"], "2");
        let fewer = json!({"metadata": {"name": "web", "annotations": {"x": "2"}}});
        let (obj, _) = s.apply(&pods(), &key(), fewer, "me", false).unwrap();
        assert!(
            obj["metadata"]["annotations"].get("mine").is_none(),
            "{obj}"
        );
        assert_eq!(obj["spec"]["nodeName"], "n1");
    }

    #[test]
    fn the_event_window_compacts_old_versions() {
        let mut s = Store::new(2);
        for i in 0..4 {
            s.create(
                &pods(),
                "default",
                json!({"metadata": {"name": format!("p{i}")}}),
                "t",
            )
            .unwrap();
        }
        assert_eq!(s.log.len(), 2);
        assert_eq!(s.compacted, s.log[0].rv - 1);
    }
}
