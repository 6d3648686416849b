//! Destinations looked up on demand (`--scoped`): a connection to an address the proxy holds
//! no filter chain for asks the controller for that address's listener
//! (`mesh_api::consts::xds::address_listener`) and waits, a bounded while, until the listener
//! and what it names are running or the controller said there is none (then the connection
//! passes through, as to any address outside the mesh).
//!
//! The xDS client takes the requests, subscribes by name, and reports back: [`OnDemand::absent`]
//! when a response removes a name asked for, [`OnDemand::notify`] after each published config.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use futures::channel::mpsc;
use mesh_api::consts::xds::address_listener;
use tokio::sync::watch;
use tracing::warn;

use crate::state::Store;

/// Most addresses asked for; past it a new address is not asked for and passes through.
pub const MAX_ASKED: usize = 10_000;

/// How long a connection waits for its destination's config.
pub const WAIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct OnDemand {
    tx: mpsc::UnboundedSender<SocketAddr>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<SocketAddr>>>,
    /// Addresses asked for; `true` once the controller said it has no listener for one.
    asked: Mutex<HashMap<SocketAddr, bool>>,
    /// Bumped when an answer may have arrived.
    changed: watch::Sender<u64>,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The address's listener is in the running config.
    Found,
    /// The mesh has nothing at this address (or too many were asked for): pass through.
    Absent,
    /// No answer within the wait.
    TimedOut,
}

impl Default for OnDemand {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded();
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            asked: Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }
}

impl OnDemand {
    fn asked(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, bool>> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The addresses to look up, in the order asked; the xDS client takes it once.
    pub fn requests(&self) -> Option<mpsc::UnboundedReceiver<SocketAddr>> {
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
        if store.load().is_some_and(|s| s.listeners.contains_key(name)) {
            return Some(Lookup::Found);
        }
        (self.asked().get(&dst) == Some(&true)).then_some(Lookup::Absent)
    }

    /// Finds `dst`'s config, asking the controller for it the first time, waiting up to
    /// `within`.
    pub async fn lookup(&self, dst: SocketAddr, store: &Store, within: Duration) -> Lookup {
        let name = address_listener(dst);
        if let Some(found) = self.known(dst, &name, store) {
            return found;
        }
        // Subscribed before looking again, so an answer in between is not missed.
        let mut changed = self.changed.subscribe();
        {
            let mut asked = self.asked();
            let full = asked.len() >= MAX_ASKED;
            match asked.entry(dst) {
                Entry::Occupied(_) => {}
                Entry::Vacant(_) if full => {
                    warn!(%dst, max = MAX_ASKED, "too many destinations looked up on demand; passing through");
                    return Lookup::Absent;
                }
                Entry::Vacant(v) => {
                    v.insert(false);
                    let _ = self.tx.unbounded_send(dst);
                }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::StreamExt;

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
        assert_eq!(requests.next().await, Some(dst));
        // The listener arrives and runs.
        store.publish(snapshot_with("10.96.0.12_80"));
        od.notify();
        assert_eq!(waiter.await.expect("joins"), Lookup::Found);
        assert_eq!(second.await.expect("joins"), Lookup::Found);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), requests.next())
                .await
                .is_err(),
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
            assert_eq!(requests.next().await, Some(dst));
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
