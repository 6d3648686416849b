//! Which controller replica to stream from: the `--xds` targets, resolved at the start of each
//! round of attempts, tried one after another, and a short wait only once every address of a
//! round has failed.
//!
//! A target is `host:port`; a host name may resolve to several addresses (the chart's headless
//! `mesh-controller-xds` Service lists every ready replica). A round starts at a random address
//! other than the one whose stream just ended, so proxies spread over the replicas at start and
//! again whenever they move: the proxies of a replica that goes away land on the others evenly,
//! within one connect each.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_api::backoff::Backoff;
use tracing::warn;

/// The longest wait between two rounds of attempts: a controller back after an outage is
/// found again within this (the wait doubles from 10 ms up to it).
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(2);

/// How long a stream must have lasted, with a response, to count as one that worked: a
/// replica that ends streams sooner (it cannot serve this proxy, or is shutting down) is
/// treated as a failed attempt, so a proxy never reconnects in a tight loop.
pub(crate) const WORKED_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("{target:?} is not host:port: {why}")]
    Target { target: String, why: &'static str },
    #[error("resolving {target}: {source}")]
    Resolve {
        target: String,
        source: std::io::Error,
    },
    #[error("no address for {0}")]
    NoAddress(String),
}

/// Checks one `--xds` target: `host:port`, the host a name, an IPv4 address or a bracketed
/// IPv6 address.
pub(crate) fn parse_target(s: &str) -> Result<String, Error> {
    let s = s.trim();
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    let bad = |why| Error::Target {
        target: s.to_string(),
        why,
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if host.contains(':') || host.contains('[') {
        return Err(bad("an IPv6 address goes in brackets, [addr]:port"));
    }
    if host.contains('/') || host.contains(char::is_whitespace) {
        return Err(bad("the host is not a name"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad("the port is not 1-65535")),
        Ok(_) => Ok(s.to_string()),
    }
}

/// The replicas and where the next attempt goes.
#[derive(Debug)]
pub(crate) struct Servers {
    targets: Vec<String>,
    /// This round's addresses, sorted; empty when the next attempt starts a round.
    addrs: Vec<SocketAddr>,
    /// Where this round started, and how many of its attempts failed.
    start: usize,
    failed: usize,
    /// The address of the stream that ended last, avoided when a round starts.
    last: Option<SocketAddr>,
    backoff: Backoff,
}

/// What to do after a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum After {
    /// Connect to the next address now.
    Now,
    /// Every address of the round failed: wait, then resolve the targets again.
    Wait(Duration),
}

impl Servers {
    pub(crate) fn new(targets: Vec<String>) -> Self {
        Self {
            targets,
            addrs: Vec::new(),
            start: 0,
            failed: 0,
            last: None,
            backoff: Backoff::new(Duration::from_millis(10), MAX_WAIT),
        }
    }

    /// The address to connect to, resolving the targets when a round begins.
    pub(crate) async fn pick(&mut self) -> Result<SocketAddr, Error> {
        if self.addrs.is_empty() {
            self.begin(resolve(&self.targets).await?);
        }
        Ok(self.addrs[(self.start + self.failed) % self.addrs.len()])
    }

    /// A round over `addrs`, from a random one that is not the last address, when it can.
    fn begin(&mut self, addrs: Vec<SocketAddr>) {
        let others: Vec<usize> = (0..addrs.len())
            .filter(|&i| Some(addrs[i]) != self.last)
            .collect();
        self.start = match others.len() {
            0 => 0,
            n => others[rand::random_range(0..n)],
        };
        self.addrs = addrs;
        self.failed = 0;
    }

    /// The stream on the picked address ended; `worked`: it carried a response and lasted
    /// [`WORKED_AFTER`]. After one that worked, a new round starts at once elsewhere; after a
    /// failure, the round's next address is tried at once, and only a round in which every
    /// address failed waits.
    pub(crate) fn ended(&mut self, addr: SocketAddr, worked: bool) -> After {
        self.last = Some(addr);
        if worked {
            self.backoff.reset();
            self.addrs.clear();
            return After::Now;
        }
        self.failed += 1;
        if self.failed < self.addrs.len() {
            return After::Now;
        }
        self.addrs.clear();
        After::Wait(self.backoff.next_delay())
    }

    /// Resolving failed: wait as after a failed round.
    pub(crate) fn unresolved(&mut self) -> Duration {
        self.addrs.clear();
        self.backoff.next_delay()
    }
}

/// Every address of every target, sorted and without repeats. A target that does not resolve
/// is logged and left out while another does.
async fn resolve(targets: &[String]) -> Result<Vec<SocketAddr>, Error> {
    let mut addrs = Vec::new();
    let mut first_error = None;
    for t in targets {
        match tokio::net::lookup_host(t.as_str()).await {
            Ok(found) => addrs.extend(found),
            Err(source) => {
                warn!(target = %t, error = %source, "an xDS target does not resolve");
                first_error.get_or_insert(Error::Resolve {
                    target: t.clone(),
                    source,
                });
            }
        }
    }
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(first_error.unwrap_or_else(|| Error::NoAddress(targets.join(", "))));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn targets_are_host_and_port() {
        for good in [
            "127.0.0.1:15010",
            "[::1]:15010",
            "mesh-controller-xds.mesh-system.svc:15010",
            "localhost:1",
        ] {
            assert_eq!(parse_target(good).ok().as_deref(), Some(good));
        }
        for (bad, why) in [
            ("mesh-controller", "no port"),
            (":15010", "no host"),
            ("::1:15010", "brackets"),
            ("host:0", "1-65535"),
            ("host:http", "1-65535"),
            ("a/b:1", "not a name"),
        ] {
            let e = parse_target(bad).expect_err(bad).to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    fn addr(a: &str) -> SocketAddr {
        a.parse().expect("an address")
    }

    const TWO: [&str; 2] = ["10.0.0.1:15010", "10.0.0.2:15010"];

    fn servers(targets: &[&str]) -> Servers {
        Servers::new(targets.iter().map(|t| t.to_string()).collect())
    }

    #[tokio::test]
    async fn a_round_tries_every_address_once_then_waits_longer_up_to_a_cap() {
        let mut s = servers(&TWO);
        let first = s.pick().await.expect("an address");
        assert_eq!(s.ended(first, false), After::Now);
        let second = s.pick().await.expect("an address");
        assert_ne!(first, second, "the round's other address");
        let After::Wait(wait) = s.ended(second, false) else {
            panic!("a round of failures waits");
        };
        assert!(wait <= Duration::from_millis(10), "{wait:?}");
        let mut last = wait;
        for _ in 0..20 {
            for _ in 0..2 {
                let a = s.pick().await.expect("an address");
                if let After::Wait(d) = s.ended(a, false) {
                    last = d;
                }
            }
        }
        assert!(last >= MAX_WAIT / 2 && last <= MAX_WAIT, "{last:?}");
    }

    #[tokio::test]
    async fn after_a_stream_that_worked_the_next_round_starts_at_another_replica_at_once() {
        let mut s = servers(&TWO);
        // A failure does not carry over: the round that follows a worked stream is whole.
        let a = s.pick().await.expect("an address");
        assert_eq!(s.ended(a, false), After::Now);
        let b = s.pick().await.expect("an address");
        assert_eq!(s.ended(b, true), After::Now);
        assert_eq!(
            s.pick().await.expect("an address"),
            a,
            "not the one that just ended"
        );
        assert_eq!(
            s.ended(a, false),
            After::Now,
            "one failure of a fresh round"
        );
    }

    #[tokio::test]
    async fn the_proxies_of_a_lost_replica_spread_over_the_others() {
        let three = ["10.0.0.1:15010", "10.0.0.2:15010", "10.0.0.3:15010"];
        let mut landed: BTreeMap<SocketAddr, usize> = BTreeMap::new();
        for _ in 0..600 {
            let mut s = servers(&three);
            let on = addr("10.0.0.2:15010");
            // A proxy that streamed from .2 until it went away.
            assert_eq!(s.ended(on, true), After::Now);
            *landed
                .entry(s.pick().await.expect("an address"))
                .or_default() += 1;
        }
        assert_eq!(landed.get(&addr("10.0.0.2:15010")), None, "{landed:?}");
        for n in landed.values() {
            assert!((200..=400).contains(n), "uneven: {landed:?}");
        }
    }

    #[tokio::test]
    async fn one_address_is_retried_after_a_wait() {
        let mut s = servers(&["10.0.0.1:15010"]);
        let a = s.pick().await.expect("an address");
        assert_eq!(s.ended(a, true), After::Now, "it worked: once more, now");
        assert_eq!(s.pick().await.expect("an address"), a);
        assert!(matches!(s.ended(a, false), After::Wait(_)));
    }

    #[tokio::test]
    async fn names_resolve_to_their_addresses_without_repeats() {
        let mut s = servers(&["127.0.0.1:1", "localhost:1", "127.0.0.1:1"]);
        s.pick().await.expect("an address");
        assert_eq!(
            s.addrs
                .iter()
                .filter(|a| **a == addr("127.0.0.1:1"))
                .count(),
            1,
            "{:?}",
            s.addrs
        );
    }
}
