//! Connection caps: how many connections a listener holds at once, in all
//! and per peer address. Each admitted connection holds a [`Permit`] that
//! gives its place back when dropped, whatever path the connection ends by.
//!
//! No global lock on the accept path: the total is one atomic counter, the
//! per-peer counts live in shards chosen by a keyed hash of the address.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

const SHARDS: usize = 64;

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapExceeded {
    #[error("{max} connections open (the global cap); refused {peer}")]
    Total { peer: IpAddr, max: usize },
    #[error("{max} connections open from {peer} (the per-peer cap)")]
    PerPeer { peer: IpAddr, max: usize },
}

/// The caps and the counts under them. Share it (`Arc`) between every
/// listener the caps should cover.
#[derive(Debug)]
pub struct ConnectionCaps {
    max_total: usize,
    max_per_peer: usize,
    open: AtomicUsize,
    peers: Box<[Mutex<HashMap<IpAddr, usize>>]>,
    shard_of: RandomState,
    refused_total: AtomicU64,
    refused_per_peer: AtomicU64,
}

impl ConnectionCaps {
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<ConnectionCaps> {
        Arc::new(ConnectionCaps {
            max_total,
            max_per_peer,
            open: AtomicUsize::new(0),
            peers: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_of: RandomState::new(),
            refused_total: AtomicU64::new(0),
            refused_per_peer: AtomicU64::new(0),
        })
    }

    /// Admits one connection from `peer`, or says which cap it is over
    /// (and counts the refusal).
    pub fn try_admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, CapExceeded> {
        // A v4 client of a dual-stack listener is the same peer either way.
        let peer = peer.to_canonical();
        {
            let mut shard = self.shard(peer);
            let n = shard.entry(peer).or_insert(0);
            if *n >= self.max_per_peer {
                self.refused_per_peer.fetch_add(1, Ordering::Relaxed);
                return Err(CapExceeded::PerPeer {
                    peer,
                    max: self.max_per_peer,
                });
            }
            *n += 1;
        }
        // From here the per-peer place is held: the permit gives it back.
        let mut permit = Permit {
            caps: self.clone(),
            peer,
            counted: false,
        };
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(CapExceeded::Total {
                peer,
                max: self.max_total,
            });
        }
        permit.counted = true;
        Ok(permit)
    }

    fn shard(&self, peer: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        let i = (self.shard_of.hash_one(peer) % SHARDS as u64) as usize;
        self.peers[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections admitted and not yet closed.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections admitted from `peer` and not yet closed.
    pub fn open_from(&self, peer: IpAddr) -> usize {
        let peer = peer.to_canonical();
        self.shard(peer).get(&peer).copied().unwrap_or(0)
    }

    /// Connections refused because the global cap was reached.
    pub fn refused_total(&self) -> u64 {
        self.refused_total.load(Ordering::Relaxed)
    }

    /// Connections refused because their peer was at its cap.
    pub fn refused_per_peer(&self) -> u64 {
        self.refused_per_peer.load(Ordering::Relaxed)
    }
}

/// One admitted connection's place under the caps, given back on drop.
#[derive(Debug)]
pub struct Permit {
    caps: Arc<ConnectionCaps>,
    peer: IpAddr,
    /// Whether the global count was taken (a permit refused by the global
    /// cap only gives back its per-peer place).
    counted: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut shard = self.caps.shard(self.peer);
            if let Some(n) = shard.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shard.remove(&self.peer);
                }
            }
        }
        if self.counted {
            self.caps.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_peer_at_its_cap_is_refused_while_others_are_admitted() {
        let caps = ConnectionCaps::new(10, 2);
        let a = [
            caps.try_admit(ip("10.0.0.1")),
            caps.try_admit(ip("10.0.0.1")),
        ];
        assert!(a.iter().all(Result::is_ok));
        assert_eq!(
            caps.try_admit(ip("10.0.0.1")).unwrap_err(),
            CapExceeded::PerPeer {
                peer: ip("10.0.0.1"),
                max: 2
            }
        );
        assert!(caps.try_admit(ip("10.0.0.2")).is_ok());
        assert_eq!(caps.refused_per_peer(), 1);
        assert_eq!(caps.open_from(ip("10.0.0.1")), 2);
    }

    #[test]
    fn dropping_a_permit_gives_its_place_back() {
        let caps = ConnectionCaps::new(2, 2);
        let first = caps.try_admit(ip("10.0.0.1")).ok();
        let _second = caps.try_admit(ip("10.0.0.2")).ok();
        assert!(matches!(
            caps.try_admit(ip("10.0.0.3")),
            Err(CapExceeded::Total { max: 2, .. })
        ));
        // The refused peer holds nothing afterwards.
        assert_eq!(caps.open_from(ip("10.0.0.3")), 0);
        drop(first);
        assert_eq!(caps.open(), 1);
        assert_eq!(caps.open_from(ip("10.0.0.1")), 0);
        assert!(caps.try_admit(ip("10.0.0.3")).is_ok());
        assert_eq!(caps.refused_total(), 1);
    }

    #[test]
    fn a_v4_mapped_v6_address_is_the_same_peer_as_its_v4_address() {
        let caps = ConnectionCaps::new(10, 1);
        let _held = caps.try_admit(ip("10.0.0.1")).ok();
        assert!(caps.try_admit(ip("::ffff:10.0.0.1")).is_err());
    }
}
