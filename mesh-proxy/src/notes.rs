//! What the data path learns about a kernel flow that the kernel does not
//! know, handed to the metrics and admin readers without a lock the data
//! path could wait on: the data path only `try_send`s on a bounded
//! channel; readers drain it into their own map when they look.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use parking_lot::Mutex;

/// Notes queued at most between two reads (a scrape, a reconcile tick):
/// one per kernel flow the map can hold.
pub const CAPACITY: usize = mesh_ebpf::MAX_FLOWS as usize;

/// A fact about one kernel flow (keyed by its cookie).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// The endpoint pod (`namespace/name`) a Service flow went to.
    Endpoint(String),
    /// A delivery into a pod: who the tunnel came from (no principal for
    /// plaintext) and from which address.
    Delivery {
        source_principal: Option<String>,
        source_ip: IpAddr,
    },
}

/// The readers' side: the channel's end and what was drained from it.
type Read = (Receiver<(u64, Note)>, HashMap<u64, Note>);

/// The channel and the readers' map.
pub struct FlowNotes {
    tx: SyncSender<(u64, Note)>,
    read: Mutex<Read>,
    /// Notes lost because no reader drained the channel in time (the flow
    /// is then labelled without them).
    pub dropped: AtomicU64,
}

impl Default for FlowNotes {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl FlowNotes {
    pub fn with_capacity(capacity: usize) -> Self {
        let (tx, rx) = sync_channel(capacity);
        FlowNotes {
            tx,
            read: Mutex::new((rx, HashMap::new())),
            dropped: AtomicU64::new(0),
        }
    }

    /// Records a note; never blocks (the data path calls this).
    pub fn note(&self, cookie: u64, note: Note) {
        match self.tx.try_send((cookie, note)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn with_map<T>(&self, f: impl FnOnce(&mut HashMap<u64, Note>) -> T) -> T {
        let mut guard = self.read.lock();
        let (rx, map) = &mut *guard;
        map.extend(rx.try_iter());
        f(map)
    }

    /// The note of flow `cookie`, if any.
    pub fn get(&self, cookie: u64) -> Option<Note> {
        self.with_map(|m| m.get(&cookie).cloned())
    }

    /// Drains the channel and keeps only the notes of flows `live` accepts.
    pub fn retain(&self, live: impl Fn(u64) -> bool) {
        self.with_map(|m| m.retain(|c, _| live(*c)));
    }

    /// Drains the channel (called periodically so it never fills).
    pub fn drain(&self) {
        self.with_map(|_| ());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_reach_readers_and_a_full_channel_drops_instead_of_blocking() {
        let n = FlowNotes::with_capacity(2);
        n.note(1, Note::Endpoint("default/a".into()));
        n.note(2, Note::Endpoint("default/b".into()));
        n.note(3, Note::Endpoint("default/c".into()));
        assert_eq!(n.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(n.get(2), Some(Note::Endpoint("default/b".into())));
        assert_eq!(n.get(3), None);
        // Drained: room again.
        n.note(3, Note::Endpoint("default/c".into()));
        assert_eq!(n.get(3), Some(Note::Endpoint("default/c".into())));
        n.retain(|c| c == 3);
        assert_eq!(n.get(1), None);
        assert!(n.get(3).is_some());
    }
}
