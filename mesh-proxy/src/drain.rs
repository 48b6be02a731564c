//! Graceful shutdown, on tokio-util's `CancellationToken` and
//! `TaskTracker`: one `Trigger` owns the signal; every task holds a
//! `Watch`, stops taking new work when it fires, finishes what it has, and
//! drops its `Watch`. `Trigger::drain` returns once every `Watch` is gone
//! (or the deadline passes). `Tracker` counts open connections the same way.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

#[derive(Debug)]
pub struct Trigger {
    signal: CancellationToken,
    watches: TaskTracker,
}

#[derive(Clone, Debug)]
pub struct Watch {
    signal: CancellationToken,
    _alive: TaskTrackerToken,
}

pub fn channel() -> (Trigger, Watch) {
    let signal = CancellationToken::new();
    let watches = TaskTracker::new();
    let watch = Watch {
        signal: signal.clone(),
        _alive: watches.token(),
    };
    (Trigger { signal, watches }, watch)
}

impl Watch {
    /// Resolves when draining starts.
    pub async fn signaled(&mut self) {
        self.signal.cancelled().await
    }

    pub fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }
}

/// Counts open connections, so a drain can wait for them.
#[derive(Clone, Debug, Default)]
pub struct Tracker(TaskTracker);

/// Held by one open connection; dropping it ends the connection's count.
#[derive(Debug)]
pub struct Guard(#[allow(dead_code)] TaskTrackerToken);

impl Tracker {
    pub fn guard(&self) -> Guard {
        Guard(self.0.token())
    }

    pub fn open(&self) -> usize {
        self.0.len()
    }

    /// Waits until no connection is open, at most `deadline`. Returns
    /// whether they all finished.
    pub async fn idle(&self, deadline: Duration) -> bool {
        // `wait` returns once the tracker is closed and empty; closing
        // does not stop new guards, and it is reopened after.
        self.0.close();
        let idle = tokio::time::timeout(deadline, self.0.wait()).await.is_ok();
        self.0.reopen();
        idle
    }
}

impl Trigger {
    /// Tells every task to stop taking new work (without waiting).
    pub fn signal(&self) {
        self.signal.cancel();
    }

    /// Signals every task and waits until all have finished, at most
    /// `deadline`. Returns whether they all finished.
    pub async fn drain(self, deadline: Duration) -> bool {
        self.signal.cancel();
        self.watches.close();
        tokio::time::timeout(deadline, self.watches.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_watch() {
        let (trigger, watch) = channel();
        let mut w = watch.clone();
        let task = tokio::spawn(async move {
            w.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(w);
        });
        drop(watch);
        assert!(trigger.drain(Duration::from_secs(5)).await);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn tracker_waits_for_open_connections() {
        let t = Tracker::default();
        assert!(t.idle(Duration::from_millis(1)).await);
        let g = t.guard();
        let g2 = t.guard();
        assert_eq!(t.open(), 2);
        assert!(!t.idle(Duration::from_millis(10)).await);
        drop(g);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(g2);
        });
        assert!(t.idle(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn drain_gives_up_at_the_deadline() {
        let (trigger, watch) = channel();
        let stuck = watch.clone();
        drop(watch);
        assert!(!trigger.drain(Duration::from_millis(20)).await);
        assert!(stuck.is_draining());
    }
}
