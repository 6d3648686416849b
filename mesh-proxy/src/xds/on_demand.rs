//! Destinations looked up on demand (`--scoped`): a connection to an address the proxy holds
//! no filter chain for asks the controller for that address's listener
//! (`mesh_api::consts::xds::address_listener`) and waits, a bounded while, until the listener
//! and what it names are running or the controller said there is none (then the connection
//! passes through, as to any address outside the mesh).
//!
//! The xDS client takes the requests, subscribes by name, and reports back: [`OnDemand::absent`]
//! when a response removes a name asked for, [`OnDemand::notify`] after each published config.
//! At [`MAX_ASKED`] addresses, those found absent are forgotten (and unsubscribed from) to make
//! room; only when every one of them holds a Service does a new address pass through unasked.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::channel::mpsc;
use mesh_api::consts::xds::address_listener;
use tokio::sync::watch;
use tracing::warn;

use crate::state::{ListenerConfig, NetworkFilter, Snapshot, Store};

/// Most addresses held or asked for at once.
pub const MAX_ASKED: usize = 10_000;

/// How long a connection waits for its destination's config.
pub const WAIT: Duration = Duration::from_secs(1);

/// What the xDS client is asked to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Subscribe to this address's listener.
    Lookup(SocketAddr),
    /// Unsubscribe from these (absent) addresses' listeners.
    Forget(Vec<SocketAddr>),
}

#[derive(Debug)]
pub struct OnDemand {
    tx: mpsc::UnboundedSender<Request>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
    /// Addresses asked for; `true` once the controller said it has no listener for one.
    asked: Mutex<HashMap<SocketAddr, bool>>,
    /// Bumped when an answer may have arrived.
    changed: watch::Sender<u64>,
    /// The limit was met with nothing to forget (said once in the log).
    full_warned: AtomicBool,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The address's listener is in the running config.
    Found,
    /// The mesh has nothing at this address: pass through.
    Absent,
    /// No answer within the wait.
    TimedOut,
    /// [`MAX_ASKED`] addresses hold Services: not asked, passed through.
    OverLimit,
}

impl Lookup {
    pub fn label(&self) -> &'static str {
        match self {
            Lookup::Found => "found",
            Lookup::Absent => "absent",
            Lookup::TimedOut => "timed_out",
            Lookup::OverLimit => "over_limit",
        }
    }
}

impl Default for OnDemand {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded();
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            asked: Mutex::default(),
            changed: watch::Sender::new(0),
            full_warned: AtomicBool::new(false),
        }
    }
}

impl OnDemand {
    fn asked(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, bool>> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The addresses to look up, in the order asked; the xDS client takes it once.
    pub fn requests(&self) -> Option<mpsc::UnboundedReceiver<Request>> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The listener names of every address asked for, to subscribe to again on a new stream.
    pub fn names(&self) -> Vec<String> {
        self.asked().keys().map(|a| address_listener(*a)).collect()
    }

    /// The controller has no listener for `addr` (a response removed its name).
    pub fn absent(&self, addr: SocketAddr) {
        if let Some(a) = self.asked().get_mut(&addr) {
            *a = true;
        }
        self.notify();
    }

    /// A listener for `addr` arrived after all (the mesh gained a Service there).
    pub fn present(&self, addr: SocketAddr) {
        if let Some(a) = self.asked().get_mut(&addr) {
            *a = false;
        }
    }

    /// A new config runs: waiters look again.
    pub fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn known(&self, dst: SocketAddr, name: &str, store: &Store) -> Option<Lookup> {
        if store.load().is_some_and(|s| holds(&s, name)) {
            return Some(Lookup::Found);
        }
        // Gone from `asked`: only addresses found absent are forgotten.
        match self.asked().get(&dst) {
            Some(true) | None => Some(Lookup::Absent),
            Some(false) => None,
        }
    }

    /// Finds `dst`'s config, asking the controller for it the first time, waiting up to
    /// `within`.
    pub async fn lookup(&self, dst: SocketAddr, store: &Store, within: Duration) -> Lookup {
        let name = address_listener(dst);
        if store.load().is_some_and(|s| holds(&s, &name)) {
            return Lookup::Found;
        }
        if self.asked().get(&dst) == Some(&true) {
            return Lookup::Absent;
        }
        // Subscribed before looking again, so an answer in between is not missed.
        let mut changed = self.changed.subscribe();
        {
            let mut asked = self.asked();
            if asked.len() >= MAX_ASKED && !asked.contains_key(&dst) {
                let absent: Vec<SocketAddr> = asked
                    .iter()
                    .filter(|(_, absent)| **absent)
                    .map(|(a, _)| *a)
                    .collect();
                if absent.is_empty() {
                    if !self.full_warned.swap(true, Ordering::Relaxed) {
                        warn!(%dst, max = MAX_ASKED, "as many destinations as the limit hold Services; new ones pass through without a lookup");
                    }
                    return Lookup::OverLimit;
                }
                for a in &absent {
                    asked.remove(a);
                }
                let _ = self.tx.unbounded_send(Request::Forget(absent));
            }
            if let Entry::Vacant(v) = asked.entry(dst) {
                v.insert(false);
                let _ = self.tx.unbounded_send(Request::Lookup(dst));
            }
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(found) = self.known(dst, &name, store) {
                return found;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.known(dst, &name, store).unwrap_or(Lookup::TimedOut),
            }
        }
    }
}

/// Whether `snapshot` serves the address listener `name`: it is there, with the routes its
/// chains name and the clusters those routes and chains send to.
pub fn holds(s: &Snapshot, name: &str) -> bool {
    s.listeners.get(name).is_some_and(|l| runs(s, l))
}

fn runs(s: &Snapshot, l: &ListenerConfig) -> bool {
    l.chains.iter().all(|c| match &c.filter {
        NetworkFilter::Http { route, .. } => s
            .route(route)
            .is_some_and(|r| r.clusters().all(|name| s.cluster(name).is_some())),
        NetworkFilter::Tcp { cluster, .. } => s.cluster(cluster).is_some(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::{FutureExt, StreamExt};

    use super::*;
    use crate::state::{ListenerConfig, Snapshot};

    fn snapshot_with(name: &str) -> Snapshot {
        let mut s = Snapshot::default();
        s.listeners.insert(
            name.to_string(),
            Arc::new(ListenerConfig {
                name: name.to_string(),
                chains: Vec::new(),
                default_chain: None,
            }),
        );
        s
    }

    #[tokio::test]
    async fn a_lookup_asks_once_and_ends_with_the_answer() {
        let od = Arc::new(OnDemand::default());
        let store = Arc::new(Store::default());
        let mut requests = od.requests().expect("the requests");
        assert!(od.requests().is_none(), "taken once");
        let dst: SocketAddr = "10.96.0.12:80".parse().expect("an address");
        let (od2, store2) = (od.clone(), store.clone());
        let waiter = tokio::spawn(async move { od2.lookup(dst, &store2, WAIT).await });
        let (od3, store3) = (od.clone(), store.clone());
        let second = tokio::spawn(async move { od3.lookup(dst, &store3, WAIT).await });
        assert_eq!(requests.next().await, Some(Request::Lookup(dst)));
        // The listener arrives and runs.
        store.publish(snapshot_with("10.96.0.12_80"));
        od.notify();
        assert_eq!(waiter.await.expect("joins"), Lookup::Found);
        assert_eq!(second.await.expect("joins"), Lookup::Found);
        assert_eq!(
            requests.next().now_or_never(),
            None,
            "asked once for two connections"
        );
        assert_eq!(od.names(), ["10.96.0.12_80"]);
    }

    #[tokio::test]
    async fn an_address_outside_the_mesh_is_absent_and_not_asked_again() {
        let od = OnDemand::default();
        let store = Store::default();
        let mut requests = od.requests().expect("the requests");
        let dst: SocketAddr = "192.0.2.7:443".parse().expect("an address");
        let answer = async {
            assert_eq!(requests.next().await, Some(Request::Lookup(dst)));
            od.absent(dst);
        };
        let (found, ()) = tokio::join!(od.lookup(dst, &store, WAIT), answer);
        assert_eq!(found, Lookup::Absent);
        assert_eq!(od.lookup(dst, &store, WAIT).await, Lookup::Absent);
        od.present(dst);
        store.publish(snapshot_with("192.0.2.7_443"));
        assert_eq!(od.lookup(dst, &store, WAIT).await, Lookup::Found);
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_times_out() {
        let od = OnDemand::default();
        let store = Store::default();
        let dst: SocketAddr = "10.96.0.13:80".parse().expect("an address");
        assert_eq!(
            od.lookup(dst, &store, Duration::from_millis(100)).await,
            Lookup::TimedOut
        );
    }
}

#[cfg(test)]
mod limit_tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_the_limit_absent_addresses_are_forgotten_to_make_room() {
        let od = OnDemand::default();
        let store = Store::default();
        let mut requests = od.requests().expect("the requests");
        let addr = |i: usize| SocketAddr::from(([192, 0, (i / 256) as u8, (i % 256) as u8], 443));
        {
            let mut asked = od.asked();
            for i in 0..MAX_ASKED {
                // Half outside the mesh, half waiting.
                asked.insert(addr(i), i % 2 == 0);
            }
        }
        let new = SocketAddr::from(([10, 96, 0, 1], 80));
        let lookup = od.lookup(new, &store, Duration::from_millis(1));
        assert_eq!(lookup.await, Lookup::TimedOut);
        match requests.next().await {
            Some(Request::Forget(gone)) => assert_eq!(gone.len(), MAX_ASKED / 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(requests.next().await, Some(Request::Lookup(new)));
        assert_eq!(od.asked().len(), MAX_ASKED / 2 + 1);
        // Full of addresses that all hold Services: a new one passes through, unasked.
        {
            let mut asked = od.asked();
            for i in 0..MAX_ASKED {
                asked.insert(addr(i), false);
            }
        }
        let other = SocketAddr::from(([10, 96, 0, 2], 80));
        assert_eq!(od.lookup(other, &store, WAIT).await, Lookup::OverLimit);
    }
}
