//! What each workload's scoped proxies looked up, remembered so that every proxy of the
//! workload (a restarted pod, a new replica) is given those destinations up front instead of
//! looking each one up on its first connection.
//!
//! A destination is learned when a scoped proxy subscribes by name to the listener of an
//! address a Service owns (`mesh_api::consts::xds::address_listener`): mesh-proxy does so for
//! every destination it connects to, also one it was sent up front, and unsubscribes once it
//! sat idle. It stays learned while any proxy of the workload holds it by name. When the last
//! one unsubscribes, no pod of the workload uses it and it is forgotten at once; when the last
//! one's stream ends instead (its pod went away, or moved to another controller replica), it is
//! remembered for [`REMEMBER`], so the pod that replaces it finds it.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::warn;

/// How long a destination is still sent up front after the last stream that held it ended.
pub const REMEMBER: Duration = Duration::from_secs(3600);

/// Most destinations learned per workload: beyond, its proxies still look the others up, but
/// they are not sent to the whole workload (one client that sweeps every address of the mesh
/// would otherwise give every replica the whole mesh).
pub const MAX_PER_WORKLOAD: usize = 1_000;

/// A workload: its namespace and name (`mesh_api::workload::name`, or the pod's own name when
/// the controller does not know the pod).
pub type WorkloadKey = (String, String);

#[derive(Debug)]
struct Use {
    /// Streams subscribed to it by name.
    holders: u32,
    /// When the last holder's stream ended.
    released: Instant,
}

/// One workload's destinations, and the ticks its streams wait on.
#[derive(Debug)]
struct Workload {
    uses: HashMap<SocketAddr, Use>,
    changed: watch::Sender<u64>,
    /// [`MAX_PER_WORKLOAD`] was met (said once in the log).
    full: bool,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            uses: HashMap::new(),
            changed: watch::Sender::new(0),
            full: false,
        }
    }
}

impl Workload {
    fn tick(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Learned destinations by workload. Each workload's streams wait on its own tick
/// ([`Learned::changed`]), so a change wakes only the proxies it concerns.
#[derive(Debug, Default)]
pub struct Learned {
    by_workload: Mutex<HashMap<WorkloadKey, Workload>>,
}

impl Learned {
    fn lock(&self) -> MutexGuard<'_, HashMap<WorkloadKey, Workload>> {
        self.by_workload
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Ticks whenever `workload`'s set changes.
    pub fn changed(&self, workload: &WorkloadKey) -> watch::Receiver<u64> {
        self.lock()
            .entry(workload.clone())
            .or_default()
            .changed
            .subscribe()
    }

    /// A proxy of `workload` subscribed to `addr`'s listener by name.
    pub fn hold(&self, workload: &WorkloadKey, addr: SocketAddr, now: Instant) {
        let mut all = self.lock();
        let w = all.entry(workload.clone()).or_default();
        let room = w.uses.len() < MAX_PER_WORKLOAD;
        match w.uses.entry(addr) {
            Entry::Vacant(_) if !room => {
                if !std::mem::replace(&mut w.full, true) {
                    warn!(namespace = %workload.0, workload = %workload.1, max = MAX_PER_WORKLOAD, "a workload looked up as many destinations as are learned for one; further ones are not sent to its other pods");
                }
            }
            Entry::Vacant(v) => {
                v.insert(Use {
                    holders: 1,
                    released: now,
                });
                w.tick();
            }
            Entry::Occupied(mut o) => o.get_mut().holders += 1,
        }
    }

    /// A proxy of `workload` no longer holds `addr` by name: it unsubscribed (`remember`
    /// false: the destination is forgotten unless another proxy holds it), or its stream ended
    /// (`remember`: kept for [`REMEMBER`] after `now`).
    pub fn release(&self, workload: &WorkloadKey, addr: SocketAddr, now: Instant, remember: bool) {
        let mut all = self.lock();
        let Some(w) = all.get_mut(workload) else {
            return;
        };
        let Some(u) = w.uses.get_mut(&addr) else {
            return;
        };
        u.holders = u.holders.saturating_sub(1);
        if u.holders > 0 {
            return;
        }
        u.released = now;
        if !remember {
            w.uses.remove(&addr);
            w.tick();
        }
    }

    /// The destinations `workload`'s proxies are given up front.
    pub fn of(&self, workload: &WorkloadKey) -> BTreeSet<SocketAddr> {
        self.lock()
            .get(workload)
            .map(|w| w.uses.keys().copied().collect())
            .unwrap_or_default()
    }

    /// How many streams hold `addr` by name for `workload`.
    #[cfg(any(test, feature = "testing"))]
    pub fn holders(&self, workload: &WorkloadKey, addr: SocketAddr) -> u32 {
        self.lock()
            .get(workload)
            .and_then(|w| w.uses.get(&addr))
            .map_or(0, |u| u.holders)
    }

    /// Forgets what no stream held by name since [`REMEMBER`] before `now`, and workloads
    /// with nothing learned and no stream waiting.
    pub fn sweep(&self, now: Instant) {
        self.lock().retain(|_, w| {
            let before = w.uses.len();
            w.uses
                .retain(|_, u| u.holders > 0 || now.duration_since(u.released) < REMEMBER);
            if w.uses.len() != before {
                w.tick();
            }
            !w.uses.is_empty() || w.changed.receiver_count() > 0
        });
    }

    /// Forgets unused destinations once a minute, for as long as it runs.
    pub async fn forget_unused(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_is_held_while_subscribed_and_remembered_after_a_stream_ends() {
        let l = Learned::default();
        let mut ticks = l.changed(&("shop".into(), "client".into()));
        let other_ticks = l.changed(&("shop".into(), "other".into()));
        let w: WorkloadKey = ("shop".into(), "client".into());
        let other: WorkloadKey = ("shop".into(), "other".into());
        let a: SocketAddr = "10.96.0.1:80".parse().expect("an address");
        let t0 = Instant::now();
        l.hold(&w, a, t0);
        assert!(
            ticks.has_changed().expect("open"),
            "a new destination ticks"
        );
        ticks.borrow_and_update();
        l.hold(&w, a, t0);
        assert!(
            !ticks.has_changed().expect("open"),
            "a second holder does not"
        );
        assert_eq!(l.of(&w), BTreeSet::from([a]));
        assert!(l.of(&other).is_empty(), "learned per workload");
        // One proxy lets it go as idle: the other still holds it.
        l.release(&w, a, t0, false);
        l.sweep(t0 + 2 * REMEMBER);
        assert_eq!(l.of(&w), BTreeSet::from([a]), "one holder left");
        assert!(!ticks.has_changed().expect("open"));
        // The other's stream ends: remembered for a while, then forgotten.
        l.release(&w, a, t0 + REMEMBER, true);
        l.sweep(t0 + REMEMBER + REMEMBER / 2);
        assert_eq!(l.of(&w), BTreeSet::from([a]), "remembered");
        assert!(!ticks.has_changed().expect("open"));
        l.sweep(t0 + 2 * REMEMBER);
        assert!(l.of(&w).is_empty(), "forgotten");
        assert!(ticks.has_changed().expect("open"), "forgetting ticks");
        ticks.borrow_and_update();
        // The last holder unsubscribing forgets it at once.
        l.hold(&w, a, t0);
        ticks.borrow_and_update();
        l.release(&w, a, t0, false);
        assert!(l.of(&w).is_empty(), "no proxy uses it");
        assert!(ticks.has_changed().expect("open"));
        assert!(
            !other_ticks.has_changed().expect("open"),
            "another workload's streams are not woken"
        );
        // At most MAX_PER_WORKLOAD are learned; holding and letting go of one more is a no-op.
        for i in 0..=MAX_PER_WORKLOAD {
            let a = SocketAddr::from(([10, 97, (i / 256) as u8, (i % 256) as u8], 80));
            l.hold(&other, a, t0);
        }
        assert_eq!(l.of(&other).len(), MAX_PER_WORKLOAD);
        let last = SocketAddr::from(([10, 97, 3, 232], 80));
        assert!(!l.of(&other).contains(&last));
        l.release(&other, last, t0, false);
        assert_eq!(l.of(&other).len(), MAX_PER_WORKLOAD);
    }
}
