//! The installer the node DaemonSet runs: puts the binary in the CNI bin
//! dir and mesh-cni at the end of the first conflist of the CNI conf dir,
//! each by writing a temporary file and renaming it over the target (the
//! runtime never reads half a file), keeps it there while the primary CNI
//! rewrites that file, and takes both out again on uninstall.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const PLUGIN_TYPE: &str = "mesh-cni";
pub const BINARY_NAME: &str = "mesh-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("conflist {path}: {reason}")]
    Conflist { path: PathBuf, reason: String },
    #[error("no *.conflist in {0}: install the primary CNI first (mesh-cni is chained after it)")]
    NoConflist(PathBuf),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The plugin's entry in the conflist.
#[derive(Debug, Clone)]
pub struct PluginEntry {
    pub socket: PathBuf,
    pub log_file: Option<PathBuf>,
    pub fail_open_namespaces: Vec<String>,
    pub timeout_seconds: u64,
}

impl PluginEntry {
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "type": PLUGIN_TYPE,
            "socket": self.socket,
            "timeoutSeconds": self.timeout_seconds,
        });
        if let Some(l) = &self.log_file {
            v["logFile"] = serde_json::json!(l);
        }
        if !self.fail_open_namespaces.is_empty() {
            v["failOpenNamespaces"] = serde_json::json!(self.fail_open_namespaces);
        }
        v
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, synced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Hidden and without a .conf/.conflist/.json suffix: runtimes skip it.
    let tmp = dir.join(format!(".{name}.mesh-cni-{}.tmp", std::process::id()));
    let r = (|| {
        let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io("chmod", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename into place", path))
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// The conflist the runtime uses: the first `*.conflist` by name.
pub fn first_conflist(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut lists: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io("read conf dir", conf_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist") && p.is_file())
        .collect();
    lists.sort();
    lists
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConflist(conf_dir.to_owned()))
}

fn plugins_mut<'a>(doc: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>, InstallError> {
    doc.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| InstallError::Conflist {
            path: path.to_owned(),
            reason: "no \"plugins\" list".into(),
        })
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Whether `conflist` holds exactly `entry` as its last plugin.
pub fn is_inserted(conflist: &Path, entry: &PluginEntry) -> Result<bool, InstallError> {
    let text = fs::read(conflist).map_err(io("read", conflist))?;
    let doc: Value = serde_json::from_slice(&text).map_err(|e| InstallError::Conflist {
        path: conflist.to_owned(),
        reason: e.to_string(),
    })?;
    let last = doc
        .get("plugins")
        .and_then(Value::as_array)
        .and_then(|p| p.last());
    Ok(last == Some(&entry.to_json()))
}

/// Puts `entry` last in `conflist` (replacing an older mesh-cni entry).
/// Returns whether the file changed.
pub fn insert(conflist: &Path, entry: &PluginEntry) -> Result<bool, InstallError> {
    let text = fs::read(conflist).map_err(io("read", conflist))?;
    let mut doc: Value = serde_json::from_slice(&text).map_err(|e| InstallError::Conflist {
        path: conflist.to_owned(),
        reason: e.to_string(),
    })?;
    let plugins = plugins_mut(&mut doc, conflist)?;
    let want = entry.to_json();
    if plugins.last() == Some(&want) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return Ok(false);
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(want);
    let mut out = serde_json::to_vec_pretty(&doc).map_err(|e| InstallError::Conflist {
        path: conflist.to_owned(),
        reason: e.to_string(),
    })?;
    out.push(b'\n');
    write_atomic(conflist, &out, 0o644)?;
    Ok(true)
}

/// Takes mesh-cni out of `conflist`. Returns whether the file changed.
pub fn remove(conflist: &Path) -> Result<bool, InstallError> {
    let text = fs::read(conflist).map_err(io("read", conflist))?;
    let mut doc: Value = serde_json::from_slice(&text).map_err(|e| InstallError::Conflist {
        path: conflist.to_owned(),
        reason: e.to_string(),
    })?;
    let plugins = plugins_mut(&mut doc, conflist)?;
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(false);
    }
    let mut out = serde_json::to_vec_pretty(&doc).map_err(|e| InstallError::Conflist {
        path: conflist.to_owned(),
        reason: e.to_string(),
    })?;
    out.push(b'\n');
    write_atomic(conflist, &out, 0o644)?;
    Ok(true)
}

/// Copies `binary` into `bin_dir` as `mesh-cni` (atomically, 0755).
pub fn install_binary(binary: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let bytes = fs::read(binary).map_err(io("read", binary))?;
    let to = bin_dir.join(BINARY_NAME);
    write_atomic(&to, &bytes, 0o755)?;
    Ok(to)
}

/// Installs, then (with `watch`) keeps the entry in place: every `poll`
/// the first conflist is checked and the entry put back if the primary
/// CNI rewrote the file, until `stop` says so or `watch` has passed.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &PluginEntry,
) -> Result<PathBuf, InstallError> {
    install_binary(binary, bin_dir)?;
    let list = first_conflist(conf_dir)?;
    insert(&list, entry)?;
    Ok(list)
}

/// Re-inserts the entry whenever it goes missing. Returns how many times
/// it had to, once `stop()` is true or `max` has passed.
pub fn keep_inserted(
    conf_dir: &Path,
    entry: &PluginEntry,
    poll: Duration,
    max: Option<Duration>,
    stop: &dyn Fn() -> bool,
    on_event: &mut dyn FnMut(&str),
) -> u64 {
    let start = Instant::now();
    let mut repaired = 0;
    while !stop() && max.is_none_or(|m| start.elapsed() < m) {
        match first_conflist(conf_dir).and_then(|l| insert(&l, entry).map(|c| (l, c))) {
            Ok((l, true)) => {
                repaired += 1;
                on_event(&format!("{}: mesh-cni put back", l.display()));
            }
            Ok((_, false)) => {}
            // The primary CNI may be midway through its own write (or
            // the dir briefly empty): try again next round.
            Err(e) => on_event(&format!("not inserted yet: {e}")),
        }
        std::thread::sleep(poll);
    }
    repaired
}

/// Removes the entry from every conflist of `conf_dir` and the binary.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for e in fs::read_dir(conf_dir)
        .map_err(io("read conf dir", conf_dir))?
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "conflist") && remove(&p)? {
            changed.push(p);
        }
    }
    let bin = bin_dir.join(BINARY_NAME);
    match fs::remove_file(&bin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove", &bin)(e)),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"10.9.0.0/24"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn entry() -> PluginEntry {
        PluginEntry {
            socket: "/run/sockmesh/cni.sock".into(),
            log_file: Some("/var/log/mesh-cni.log".into()),
            fail_open_namespaces: vec!["kube-system".into()],
            timeout_seconds: 30,
        }
    }

    fn types(list: &Path) -> Vec<String> {
        let v: Value = serde_json::from_slice(&fs::read(list).unwrap()).unwrap();
        v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn install_puts_the_binary_and_the_plugin_last_in_the_first_conflist_once() {
        let d = tempfile::tempdir().unwrap();
        let (bin, conf) = (d.path().join("bin"), d.path().join("conf"));
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&conf).unwrap();
        fs::write(conf.join("10-k8s.conflist"), PRIMARY).unwrap();
        fs::write(conf.join("20-other.conflist"), PRIMARY).unwrap();
        fs::write(d.path().join("mesh-cni"), b"#!binary").unwrap();
        let list = install(&d.path().join("mesh-cni"), &bin, &conf, &entry()).unwrap();
        assert_eq!(list, conf.join("10-k8s.conflist"));
        assert_eq!(types(&list), ["ptp", "portmap", "mesh-cni"]);
        assert_eq!(types(&conf.join("20-other.conflist")), ["ptp", "portmap"]);
        assert_eq!(fs::read(bin.join("mesh-cni")).unwrap(), b"#!binary");
        // Again: no second entry, file untouched.
        assert!(!insert(&list, &entry()).unwrap());
        assert_eq!(types(&list), ["ptp", "portmap", "mesh-cni"]);
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&conf).unwrap().count(), 2);
        let changed = uninstall(&bin, &conf).unwrap();
        assert_eq!(changed, vec![list.clone()]);
        assert_eq!(types(&list), ["ptp", "portmap"]);
        assert!(!bin.join("mesh-cni").exists());
        // Idempotent.
        assert!(uninstall(&bin, &conf).unwrap().is_empty());
    }

    #[test]
    fn the_watch_puts_the_plugin_back_when_the_primary_rewrites_its_file() {
        let d = tempfile::tempdir().unwrap();
        let list = d.path().join("10-k8s.conflist");
        fs::write(&list, PRIMARY).unwrap();
        insert(&list, &entry()).unwrap();
        let dir = d.path().to_owned();
        let rewriter = std::thread::spawn(move || {
            // The primary CNI writes its own file again, twice.
            for _ in 0..2 {
                std::thread::sleep(Duration::from_millis(150));
                fs::write(dir.join("10-k8s.conflist"), PRIMARY).unwrap();
            }
        });
        let mut events = Vec::new();
        let start = Instant::now();
        let n = keep_inserted(
            d.path(),
            &entry(),
            Duration::from_millis(20),
            Some(Duration::from_secs(10)),
            &|| {
                rewriter.is_finished()
                    && is_inserted(&list, &entry()).unwrap_or(false)
                    && start.elapsed() > Duration::from_millis(400)
            },
            &mut |e| events.push(e.to_owned()),
        );
        assert!(n >= 2, "repaired {n} times: {events:?}");
        assert_eq!(types(&list), ["ptp", "portmap", "mesh-cni"]);
    }

    #[test]
    fn an_empty_conf_dir_is_named() {
        let d = tempfile::tempdir().unwrap();
        let e = first_conflist(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("no *.conflist") && e.contains(&d.path().display().to_string()),
            "{e}"
        );
    }
}
