//! Graceful shutdown: one `Trigger` owns the signal; every task holds a
//! `Watch`, stops taking new work when it fires, finishes what it has, and
//! drops its `Watch`. `Trigger::drain` returns once every `Watch` is gone
//! (or the deadline passes).

use std::time::Duration;

use tokio::sync::{mpsc, watch};

#[derive(Debug)]
pub struct Trigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
    // Kept so `done` only closes when every Watch is dropped.
    _alive: Option<mpsc::Sender<()>>,
}

#[derive(Clone, Debug)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

pub fn channel() -> (Trigger, Watch) {
    let (signal, rx) = watch::channel(false);
    let (alive, done) = mpsc::channel(1);
    (
        Trigger {
            signal,
            done,
            _alive: None,
        },
        Watch {
            signal: rx,
            _alive: alive,
        },
    )
}

impl Watch {
    /// Resolves when draining starts.
    pub async fn signaled(&mut self) {
        let _ = self.signal.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

/// Counts open connections, so a drain can wait for them.
#[derive(Clone, Debug, Default)]
pub struct Tracker(std::sync::Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>);

/// Held by one open connection; dropping it ends the connection's count.
#[derive(Debug)]
pub struct Guard(Tracker);

impl Tracker {
    pub fn guard(&self) -> Guard {
        self.0.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Guard(self.clone())
    }

    pub fn open(&self) -> usize {
        self.0.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until no connection is open, at most `deadline`. Returns
    /// whether they all finished.
    pub async fn idle(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.0.1.notified();
                if self.open() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.0.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.0.0.1.notify_waiters();
        }
    }
}

impl Trigger {
    /// Tells every task to stop taking new work (without waiting).
    pub fn signal(&self) {
        let _ = self.signal.send(true);
    }

    /// Signals every task and waits until all have finished, at most
    /// `deadline`. Returns whether they all finished.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        let _ = self.signal.send(true);
        tokio::time::timeout(deadline, self.done.recv())
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
