//! Destinations looked up on demand (`--scoped`): a connection to an address the proxy holds
//! no filter chain for asks the controller for that address's listener
//! (`mesh_api::consts::xds::address_listener`) and waits, a bounded while, until the listener
//! and what it names are running or the controller said there is none (then the connection
//! passes through, as to any address outside the mesh).
//!
//! The xDS client takes the requests, subscribes by name, and reports back: [`OnDemand::absent`]
//! when a response says a name asked for does not exist, [`OnDemand::gone`] when it removes a
//! listener the proxy held (the Service left, or the answer to an unsubscribe crossed a new
//! subscription: a connection then waits for a new answer before passing through),
//! [`OnDemand::notify`] after each published config.
//! An address asked for is let go ([`OnDemand::idle`]) once no connection to it was open for
//! `--scoped-idle-timeout`: its name is unsubscribed, and the controller removes its listener
//! (unless it sends it to every proxy of the workload, as a learned destination). At
//! [`MAX_ASKED`] addresses, those found absent are forgotten (and unsubscribed from) to make
//! room; only when every one of them holds a Service does a new address pass through unasked.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use mesh_api::consts::xds::address_listener;
use tokio::sync::watch;
use tracing::{debug, warn};

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
    /// Unsubscribe from these addresses' listeners (absent, or idle).
    Forget(Vec<SocketAddr>),
}

/// What the controller said of an address asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Nothing yet, or its listener.
    Waiting,
    /// It has no listener there: pass through.
    Absent,
    /// It removed the listener the proxy held: pass through unless it comes back within a
    /// lookup's wait.
    Gone,
}

/// One address asked for.
#[derive(Debug)]
struct Asked {
    answer: Answer,
    /// Connections to it open now.
    open: u32,
    /// When the last one closed (or it was asked for).
    used: Instant,
}

#[derive(Debug)]
pub struct OnDemand {
    tx: mpsc::UnboundedSender<Request>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
    asked: Mutex<HashMap<SocketAddr, Asked>>,
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

/// A connection to an address asked for: while it is open, the address is in use.
#[derive(Debug)]
pub struct InUse {
    od: Arc<OnDemand>,
    dst: SocketAddr,
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Some(a) = self.od.asked().get_mut(&self.dst) {
            a.open = a.open.saturating_sub(1);
            a.used = Instant::now();
        }
    }
}

impl OnDemand {
    fn asked(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Asked>> {
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

    fn answer(&self, addr: SocketAddr, answer: Answer) {
        if let Some(a) = self.asked().get_mut(&addr) {
            a.answer = answer;
        }
        self.notify();
    }

    /// The controller has no listener for `addr` (a response removed a name the proxy did not
    /// hold).
    pub fn absent(&self, addr: SocketAddr) {
        self.answer(addr, Answer::Absent);
    }

    /// The controller removed the listener the proxy held for `addr`.
    pub fn gone(&self, addr: SocketAddr) {
        self.answer(addr, Answer::Gone);
    }

    /// A listener for `addr` arrived (again).
    pub fn present(&self, addr: SocketAddr) {
        if let Some(a) = self.asked().get_mut(&addr) {
            a.answer = Answer::Waiting;
        }
    }

    /// Marks `dst` in use for as long as the returned guard lives (a connection to it). An
    /// address the controller sent up front is subscribed to by name now (nothing is sent
    /// again): that tells the controller this proxy uses it, and lets it go when idle.
    pub fn in_use(self: &Arc<Self>, dst: SocketAddr) -> InUse {
        self.ask(&mut self.asked(), dst, 1);
        InUse {
            od: self.clone(),
            dst,
        }
    }

    /// Counts `dst` as asked for and used now, with `open` more connections, subscribing to
    /// it the first time. False when there is no room for it.
    fn ask(&self, asked: &mut HashMap<SocketAddr, Asked>, dst: SocketAddr, open: u32) -> bool {
        if !asked.contains_key(&dst) && !self.make_room(asked, dst) {
            return false;
        }
        match asked.entry(dst) {
            Entry::Occupied(mut o) => {
                let a = o.get_mut();
                a.open += open;
                a.used = Instant::now();
            }
            Entry::Vacant(v) => {
                v.insert(Asked {
                    answer: Answer::Waiting,
                    open,
                    used: Instant::now(),
                });
                let _ = self.tx.unbounded_send(Request::Lookup(dst));
            }
        }
        true
    }

    /// Lets go of the addresses with no connection open for `after` up to `now`: forgotten
    /// here, and sent to the xDS client to unsubscribe from. Returns them.
    pub fn idle(&self, now: Instant, after: Duration) -> Vec<SocketAddr> {
        let gone: Vec<SocketAddr> = {
            let mut asked = self.asked();
            let gone: Vec<SocketAddr> = asked
                .iter()
                .filter(|(_, a)| a.open == 0 && now.saturating_duration_since(a.used) >= after)
                .map(|(d, _)| *d)
                .collect();
            for d in &gone {
                asked.remove(d);
            }
            gone
        };
        if !gone.is_empty() {
            debug!(count = gone.len(), "letting go of idle destinations");
            let _ = self.tx.unbounded_send(Request::Forget(gone.clone()));
        }
        gone
    }

    /// Lets go of idle addresses every quarter of `after`, for as long as it runs.
    pub async fn forget_idle(self: Arc<Self>, after: Duration) {
        let mut tick = tokio::time::interval((after / 4).max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.idle(Instant::now(), after);
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
        // Gone from `asked`: found absent and forgotten at the limit, or idle.
        match self.asked().get(&dst).map(|a| a.answer) {
            Some(Answer::Absent) | None => Some(Lookup::Absent),
            Some(Answer::Waiting | Answer::Gone) => None,
        }
    }

    /// At [`MAX_ASKED`], forgets the addresses found outside the mesh that no connection uses
    /// to make room for `dst` (and tells the xDS client to unsubscribe from them). Whether
    /// there is room.
    fn make_room(&self, asked: &mut HashMap<SocketAddr, Asked>, dst: SocketAddr) -> bool {
        if asked.len() < MAX_ASKED {
            return true;
        }
        let absent: Vec<SocketAddr> = asked
            .iter()
            .filter(|(_, a)| a.answer == Answer::Absent && a.open == 0)
            .map(|(d, _)| *d)
            .collect();
        if absent.is_empty() {
            if !self.full_warned.swap(true, Ordering::Relaxed) {
                warn!(%dst, max = MAX_ASKED, "as many destinations as the limit hold Services; new ones pass through without a lookup, and those sent up front are used without telling the controller");
            }
            return false;
        }
        for a in &absent {
            asked.remove(a);
        }
        let _ = self.tx.unbounded_send(Request::Forget(absent));
        true
    }

    /// Finds `dst`'s config, asking the controller for it the first time, waiting up to
    /// `within`.
    pub async fn lookup(&self, dst: SocketAddr, store: &Store, within: Duration) -> Lookup {
        let name = address_listener(dst);
        if store.load().is_some_and(|s| holds(&s, &name)) {
            return Lookup::Found;
        }
        if self
            .asked()
            .get(&dst)
            .is_some_and(|a| a.answer == Answer::Absent)
        {
            return Lookup::Absent;
        }
        // Subscribed before looking again, so an answer in between is not missed.
        let mut changed = self.changed.subscribe();
        if !self.ask(&mut self.asked(), dst, 0) {
            return Lookup::OverLimit;
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(found) = self.known(dst, &name, store) {
                return found;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    if let Some(found) = self.known(dst, &name, store) {
                        return found;
                    }
                    // Removed and not back within the wait: the Service left.
                    let mut asked = self.asked();
                    return match asked.get_mut(&dst) {
                        Some(a) if a.answer == Answer::Gone => {
                            a.answer = Answer::Absent;
                            Lookup::Absent
                        }
                        _ => Lookup::TimedOut,
                    };
                }
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

    pub(super) fn snapshot_with(name: &str) -> Snapshot {
        let mut s = Snapshot::default();
        s.listeners.insert(
            name.to_string(),
            Arc::new(ListenerConfig {
                name: name.to_string(),
                bind: None,
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
    async fn a_removed_listener_is_waited_for_once_then_passed_through() {
        let od = Arc::new(OnDemand::default());
        let store = Arc::new(Store::default());
        let dst: SocketAddr = "10.96.0.14:80".parse().expect("an address");
        drop(od.in_use(dst));
        // Removed while held (an unsubscribe's answer crossing a new subscription): a
        // connection waits, and the listener sent again is found.
        od.gone(dst);
        let (od2, store2) = (od.clone(), store.clone());
        let waiter = tokio::spawn(async move { od2.lookup(dst, &store2, WAIT).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        store.publish(snapshot_with("10.96.0.14_80"));
        od.notify();
        assert_eq!(waiter.await.expect("joins"), Lookup::Found);
        // Removed and not sent again: after the wait it is outside the mesh, and stays so.
        store.publish(Snapshot::default());
        od.gone(dst);
        assert_eq!(od.lookup(dst, &store, WAIT).await, Lookup::Absent);
        let start = tokio::time::Instant::now();
        assert_eq!(od.lookup(dst, &store, WAIT).await, Lookup::Absent);
        assert_eq!(start.elapsed(), Duration::ZERO, "no second wait");
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

    fn asked_at(absent: bool) -> Asked {
        Asked {
            answer: if absent {
                Answer::Absent
            } else {
                Answer::Waiting
            },
            open: 0,
            used: Instant::now(),
        }
    }

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
                asked.insert(addr(i), asked_at(i % 2 == 0));
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
                asked.insert(addr(i), asked_at(false));
            }
        }
        let other = SocketAddr::from(([10, 96, 0, 2], 80));
        assert_eq!(od.lookup(other, &store, WAIT).await, Lookup::OverLimit);
    }
}

#[cfg(test)]
mod idle_tests {
    use std::sync::Arc;

    use futures::{FutureExt, StreamExt};

    use super::*;

    #[tokio::test]
    async fn a_destination_being_looked_up_is_not_let_go() {
        let od = Arc::new(OnDemand::default());
        let store = Arc::new(Store::default());
        let mut requests = od.requests().expect("the requests");
        let dst: SocketAddr = "10.96.0.23:80".parse().expect("an address");
        // As a connection does: in use first, then the lookup, which waits for the answer.
        let conn = od.in_use(dst);
        assert_eq!(requests.next().await, Some(Request::Lookup(dst)));
        let (od2, store2) = (od.clone(), store.clone());
        let waiter = tokio::spawn(async move { od2.lookup(dst, &store2, WAIT).await });
        let idle = Duration::from_secs(10);
        assert!(
            od.idle(Instant::now() + 10 * idle, idle).is_empty(),
            "in use while it waits"
        );
        store.publish(super::tests::snapshot_with("10.96.0.23_80"));
        od.notify();
        assert_eq!(waiter.await.expect("joins"), Lookup::Found);
        assert_eq!(requests.next().now_or_never(), None, "asked once");
        drop(conn);
    }

    #[tokio::test]
    async fn an_address_is_let_go_once_no_connection_used_it_for_the_idle_time() {
        let od = Arc::new(OnDemand::default());
        let store = Store::default();
        let mut requests = od.requests().expect("the requests");
        let (busy, quiet): (SocketAddr, SocketAddr) = (
            "10.96.0.20:80".parse().expect("an address"),
            "10.96.0.21:80".parse().expect("an address"),
        );
        for dst in [busy, quiet] {
            od.lookup(dst, &store, Duration::from_millis(1)).await;
            assert_eq!(requests.next().await, Some(Request::Lookup(dst)));
        }
        let idle = Duration::from_secs(600);
        let conn = od.in_use(busy);
        let later = Instant::now() + idle;
        assert!(od.idle(Instant::now(), idle).is_empty(), "nothing idle yet");
        assert_eq!(
            od.idle(later, idle),
            [quiet],
            "the busy one has a connection open"
        );
        assert_eq!(requests.next().await, Some(Request::Forget(vec![quiet])));
        assert_eq!(od.names(), ["10.96.0.20_80"]);
        drop(conn);
        assert!(
            od.idle(later, idle).is_empty(),
            "its connection closed just now"
        );
        assert_eq!(od.idle(Instant::now() + 2 * idle, idle), [busy]);
        assert_eq!(requests.next().await, Some(Request::Forget(vec![busy])));
        assert!(od.names().is_empty());
        assert_eq!(requests.next().now_or_never(), None);
        // Sent up front, not asked for: subscribed to by name on first use, and let go too.
        let sent: SocketAddr = "10.96.0.22:80".parse().expect("an address");
        let conn = od.in_use(sent);
        assert_eq!(requests.next().await, Some(Request::Lookup(sent)));
        let again = od.in_use(sent);
        drop((conn, again));
        assert_eq!(requests.next().now_or_never(), None, "asked once");
        assert_eq!(od.idle(Instant::now() + 3 * idle, idle), [sent]);
    }
}
