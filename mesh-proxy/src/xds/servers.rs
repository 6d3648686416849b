//! Which controller replica to stream from: the `--xds` targets, resolved at each round, tried
//! one after another, and a short wait only once every address of a round has failed.
//!
//! A target is `host:port`; a host name may resolve to several addresses (the chart's headless
//! `mesh-controller-xds` Service lists every ready replica). A proxy starts at a random address,
//! so proxies spread over the replicas, and moves to the next one when its stream ends: after a
//! replica goes away, the proxies it served are on another within one connect.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_api::backoff::Backoff;

/// The longest wait between two rounds of attempts: a controller back after an outage is
/// found again within this (the wait doubles from 10 ms up to it).
pub const MAX_WAIT: Duration = Duration::from_secs(2);

/// Checks one `--xds` target: `host:port`, the host a name, an IPv4 address or a bracketed
/// IPv6 address.
pub fn parse_target(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    let bad = |why: &str| format!("{s:?} is not host:port: {why}");
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
pub struct Servers {
    targets: Vec<String>,
    /// This round's addresses, sorted, so that "the next one" means the same on every round.
    addrs: Vec<SocketAddr>,
    next: usize,
    /// Attempts made in this round that got no response.
    failed: usize,
    backoff: Backoff,
}

/// What to do after a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Connect to the next address now.
    Now,
    /// Every address of the round failed: wait, then resolve the targets again.
    Wait(Duration),
}

impl Servers {
    pub fn new(targets: Vec<String>) -> Self {
        Self {
            targets,
            addrs: Vec::new(),
            next: rand::random_range(0..usize::MAX / 2),
            failed: 0,
            backoff: Backoff::new(Duration::from_millis(10), MAX_WAIT),
        }
    }

    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// The address to connect to, resolving the targets when a round begins.
    pub async fn pick(&mut self) -> Result<SocketAddr, String> {
        if self.addrs.is_empty() {
            self.addrs = resolve(&self.targets).await?;
            self.failed = 0;
        }
        Ok(self.addrs[self.next % self.addrs.len()])
    }

    /// The stream on the picked address ended; `worked`: it had carried a response. Either way
    /// the next attempt goes to the next address (a replica that closed a stream is likely
    /// going away); only a round in which every address failed waits.
    pub fn ended(&mut self, worked: bool) -> After {
        self.next = self.next.wrapping_add(1);
        if worked {
            self.backoff.reset();
            self.failed = 0;
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
    pub fn unresolved(&mut self) -> Duration {
        self.addrs.clear();
        self.backoff.next_delay()
    }
}

/// Every address of every target, sorted and without repeats.
async fn resolve(targets: &[String]) -> Result<Vec<SocketAddr>, String> {
    let mut addrs = Vec::new();
    let mut errors = Vec::new();
    for t in targets {
        match tokio::net::lookup_host(t.as_str()).await {
            Ok(found) => addrs.extend(found),
            Err(e) => errors.push(format!("{t}: {e}")),
        }
    }
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(if errors.is_empty() {
            format!("no address for {}", targets.join(", "))
        } else {
            format!("resolving {}", errors.join("; "))
        });
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_host_and_port() {
        for good in [
            "127.0.0.1:15010",
            "[::1]:15010",
            "mesh-controller-xds.mesh-system.svc:15010",
            "localhost:1",
        ] {
            assert_eq!(parse_target(good).as_deref(), Ok(good));
        }
        for (bad, why) in [
            ("mesh-controller", "no port"),
            (":15010", "no host"),
            ("::1:15010", "brackets"),
            ("host:0", "1-65535"),
            ("host:http", "1-65535"),
            ("a/b:1", "not a name"),
        ] {
            let e = parse_target(bad).expect_err(bad);
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    fn servers(addrs: &[&str]) -> Servers {
        let mut s = Servers::new(Vec::new());
        s.addrs = addrs
            .iter()
            .map(|a| a.parse().expect("an address"))
            .collect();
        s.next = 0;
        s
    }

    #[tokio::test]
    async fn a_failed_address_moves_on_at_once_and_a_failed_round_waits() {
        let mut s = servers(&["10.0.0.1:15010", "10.0.0.2:15010"]);
        assert_eq!(
            s.pick().await.expect("an address").to_string(),
            "10.0.0.1:15010"
        );
        assert_eq!(s.ended(false), After::Now);
        assert_eq!(
            s.pick().await.expect("an address").to_string(),
            "10.0.0.2:15010"
        );
        let After::Wait(first) = s.ended(false) else {
            panic!("a round of failures must wait");
        };
        assert!(first <= Duration::from_millis(10), "{first:?}");
        assert!(s.addrs.is_empty(), "the next round resolves again");
        // Waits grow to the cap and no further.
        let mut last = first;
        for _ in 0..20 {
            s.addrs = vec!["10.0.0.1:15010".parse().expect("an address")];
            s.failed = 0;
            let After::Wait(d) = s.ended(false) else {
                panic!("one address: every failure ends a round");
            };
            last = d;
        }
        assert!(last >= MAX_WAIT / 2 && last <= MAX_WAIT, "{last:?}");
    }

    #[tokio::test]
    async fn a_stream_that_worked_moves_to_the_next_replica_without_waiting() {
        let mut s = servers(&["10.0.0.1:15010", "10.0.0.2:15010"]);
        s.pick().await.expect("an address");
        assert_eq!(s.ended(false), After::Now);
        assert_eq!(
            s.pick().await.expect("an address").to_string(),
            "10.0.0.2:15010"
        );
        // That one worked, then went away: the first replica is tried next, at once, and the
        // earlier failure does not count towards a round.
        assert_eq!(s.ended(true), After::Now);
        assert_eq!(
            s.pick().await.expect("an address").to_string(),
            "10.0.0.1:15010"
        );
        assert_eq!(s.ended(false), After::Now);
    }

    #[tokio::test]
    async fn names_resolve_to_every_address() {
        let mut s = Servers::new(vec!["127.0.0.1:1".into(), "localhost:1".into()]);
        s.pick().await.expect("an address");
        assert!(
            s.addrs
                .contains(&"127.0.0.1:1".parse().expect("an address")),
            "{:?}",
            s.addrs
        );
        assert_eq!(
            s.addrs
                .iter()
                .filter(|a| a.to_string() == "127.0.0.1:1")
                .count(),
            1,
            "repeats are dropped: {:?}",
            s.addrs
        );
        let mut none = Servers::new(vec!["no-such-host.invalid:1".into()]);
        let e = none.pick().await.expect_err("no address");
        assert!(e.contains("no-such-host.invalid:1"), "{e}");
    }
}
