//! Whether a stopping node proxy is being uninstalled (`mesh uninstall`
//! deleted its DaemonSet) rather than restarted (a rolling update, a node
//! drain): only then does it remove its eBPF pins on the way out. A restart
//! keeps them, so the next proxy re-opens them and the meshed pods keep
//! their redirection (and fail closed) in between.

use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};

/// Why the proxy decided what it did, for its last log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The owning DaemonSet is gone or being deleted: remove the pins.
    Uninstall { daemonset: String },
    /// The DaemonSet is there: keep the pins for the next proxy.
    Restart { daemonset: String },
    /// Not run by a DaemonSet (no owner): keep the pins.
    NoDaemonSet,
}

/// Looks the proxy's own pod up, then the DaemonSet that owns it. A pod
/// or DaemonSet that is gone (404) or carries a deletionTimestamp counts
/// as being removed.
pub async fn verdict(client: &Client, namespace: &str, pod: &str) -> Result<Verdict, kube::Error> {
    let pods: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Pod")),
    );
    let Some(me) = pods.get_opt(pod).await? else {
        return Ok(Verdict::NoDaemonSet);
    };
    let Some(owner) = me
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .find(|o| o.kind == "DaemonSet" && o.api_version.starts_with("apps/"))
    else {
        return Ok(Verdict::NoDaemonSet);
    };
    let sets: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "DaemonSet")),
    );
    let daemonset = format!("{namespace}/{}", owner.name);
    Ok(match sets.get_opt(&owner.name).await? {
        None => Verdict::Uninstall { daemonset },
        Some(ds) if ds.metadata.deletion_timestamp.is_some() => Verdict::Uninstall { daemonset },
        Some(ds) if ds.metadata.uid.is_some() && ds.metadata.uid.as_deref() != Some(&owner.uid) => {
            // Deleted and made again under the same name: this pod's own
            // DaemonSet is gone; the new one's proxy takes over the pins.
            Verdict::Restart { daemonset }
        }
        Some(_) => Verdict::Restart { daemonset },
    })
}
