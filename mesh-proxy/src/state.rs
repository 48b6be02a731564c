//! The proxy's state store (the shape of ztunnel's `state/`): the pods this
//! node has enrolled, indexed by `namespace/name` and by netns cookie, and
//! the retry schedule of pods whose enrollment failed. The registry's
//! indexed snapshot (`mesh_core::registry::IndexedSnapshot`) is the other
//! half: every lookup here and there is a hash or tree lookup, never a scan
//! of the pods.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::identity::Identity;
use parking_lot::{Mutex, RwLock};

use crate::pod_status::Fault;
use crate::workloads::EnrolledPod;

/// The enrolled pods. Written by the control plane (enroll, update,
/// unenroll); read by the data path when it dials for a pod and by
/// metrics when they label a flow by its netns cookie.
#[derive(Default)]
pub struct EnrolledPods {
    table: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    by_key: BTreeMap<String, Arc<EnrolledPod>>,
    by_cookie: HashMap<u64, Arc<EnrolledPod>>,
}

impl EnrolledPods {
    pub fn get(&self, key: &str) -> Option<Arc<EnrolledPod>> {
        self.table.read().by_key.get(key).cloned()
    }

    /// The pod whose network namespace has `cookie`.
    pub fn by_cookie(&self, cookie: u64) -> Option<Arc<EnrolledPod>> {
        self.table.read().by_cookie.get(&cookie).cloned()
    }

    /// Every enrolled pod, by key.
    pub fn all(&self) -> Vec<Arc<EnrolledPod>> {
        self.table.read().by_key.values().cloned().collect()
    }

    pub fn keys(&self) -> Vec<String> {
        self.table.read().by_key.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.table.read().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn insert(&self, pod: Arc<EnrolledPod>) {
        let mut t = self.table.write();
        t.by_cookie.insert(pod.cookie, pod.clone());
        if let Some(old) = t.by_key.insert(pod.key.clone(), pod.clone())
            && old.cookie != pod.cookie
        {
            t.by_cookie.remove(&old.cookie);
        }
    }

    pub fn remove(&self, key: &str) -> Option<Arc<EnrolledPod>> {
        let mut t = self.table.write();
        let pod = t.by_key.remove(key)?;
        if t.by_cookie.get(&pod.cookie).is_some_and(|p| p.key == key) {
            t.by_cookie.remove(&pod.cookie);
        }
        Some(pod)
    }

    /// Whether an enrolled pod presents `identity` (pods of one service
    /// account share its certificate).
    pub fn uses(&self, identity: &Identity) -> bool {
        self.table
            .read()
            .by_key
            .values()
            .any(|p| p.spec().identity == *identity)
    }
}

/// When a pod whose enrollment failed is tried again: after `base`, then
/// twice as long after each failure, at most `max`.
pub struct Backoff {
    base: Duration,
    max: Duration,
    failing: Mutex<HashMap<String, Failure>>,
}

struct Failure {
    attempts: u32,
    next: Instant,
    fault: Fault,
    error: String,
    /// A new failure not yet reported (as a Kubernetes Event).
    unreported: bool,
}

/// What a failure means for the log.
#[derive(Debug, PartialEq, Eq)]
pub struct Retry {
    /// The first failure, or a different error than the last one: worth a
    /// warning. A repeat of the same error is only worth a debug line.
    pub news: bool,
    pub attempts: u32,
    pub after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            failing: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` may be tried at `now`.
    pub fn due(&self, key: &str, now: Instant) -> bool {
        self.failing.lock().get(key).is_none_or(|f| f.next <= now)
    }

    /// Records a failure of `key` at `now`; the next try is due after
    /// `base * 2^(attempts - 1)`, at most `max`.
    pub fn failed(&self, key: &str, fault: Fault, error: &str, now: Instant) -> Retry {
        let mut failing = self.failing.lock();
        let f = failing.entry(key.to_owned()).or_insert(Failure {
            attempts: 0,
            next: now,
            fault,
            error: String::new(),
            unreported: false,
        });
        let news = f.attempts == 0 || f.error != error;
        f.unreported |= news;
        f.fault = fault;
        f.attempts = f.attempts.saturating_add(1);
        let after = self
            .base
            .saturating_mul(1u32 << (f.attempts - 1).min(16))
            .min(self.max);
        f.next = now + after;
        f.error = error.to_owned();
        Retry {
            news,
            attempts: f.attempts,
            after,
        }
    }

    /// The last failure of `key`, while it waits for a retry.
    pub fn failure(&self, key: &str) -> Option<(Fault, String)> {
        self.failing
            .lock()
            .get(key)
            .map(|f| (f.fault, f.error.clone()))
    }

    /// The failures that are news (a first failure, or a different error)
    /// and were not taken yet, by key; each is taken once.
    pub fn take_news(&self) -> Vec<(String, Fault, String)> {
        let mut failing = self.failing.lock();
        failing
            .iter_mut()
            .filter(|(_, f)| f.unreported)
            .map(|(k, f)| {
                f.unreported = false;
                (k.clone(), f.fault, f.error.clone())
            })
            .collect()
    }

    /// Forgets `key`'s failures (it enrolled, or it is gone).
    pub fn succeeded(&self, key: &str) {
        self.failing.lock().remove(key);
    }

    /// Keeps only the pods `wanted` accepts.
    pub fn retain(&self, wanted: impl Fn(&str) -> bool) {
        self.failing.lock().retain(|k, _| wanted(k));
    }

    /// Pods waiting for a retry.
    pub fn failing(&self) -> usize {
        self.failing.lock().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    const CA: Fault = Fault::CertificateRefused;
    const EF: Fault = Fault::EnrollmentFailed;

    #[test]
    fn a_failing_pod_waits_twice_as_long_each_time_up_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let t0 = Instant::now();
        assert!(b.due("default/web", t0));
        let waits: Vec<_> = (0..6)
            .map(|_| b.failed("default/web", CA, "CA down", t0).after)
            .collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 4000, 4000].map(Duration::from_millis)
        );
        assert!(!b.due("default/web", t0 + Duration::from_secs(3)));
        assert!(b.due("default/web", t0 + Duration::from_secs(4)));
        assert!(b.due("default/other", t0), "backoff is per pod");
        b.succeeded("default/web");
        assert!(b.due("default/web", t0));
        assert_eq!(b.failing(), 0);
    }

    #[test]
    fn only_a_new_error_is_news() {
        let b = Backoff::default();
        let t0 = Instant::now();
        assert!(b.failed("p", CA, "CA down", t0).news);
        assert!(!b.failed("p", CA, "CA down", t0).news);
        assert_eq!(b.take_news(), [("p".to_owned(), CA, "CA down".to_owned())]);
        assert!(!b.failed("p", CA, "CA down", t0).news);
        assert_eq!(b.take_news(), [], "a repeat is not news");
        assert!(b.failed("p", EF, "no netns", t0).news);
        assert_eq!(b.failure("p"), Some((EF, "no netns".to_owned())));
        assert_eq!(b.take_news(), [("p".to_owned(), EF, "no netns".to_owned())]);
        b.retain(|k| k != "p");
        assert_eq!(b.failure("p"), None);
        assert!(b.failed("p", EF, "no netns", t0).news);
    }
}
