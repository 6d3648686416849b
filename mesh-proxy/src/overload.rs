//! Load shedding under memory pressure, as Envoy's overload manager does it: with
//! `--memory-limit` set (the container's limit), once resident memory passes 95 % of it new
//! requests are answered 503 rather than taken on, until it is back under 90 %. Connections
//! are still accepted, so that clients get the 503 and can go elsewhere; what a request
//! already holds is let finish. The reference is `docs/reference/proxy.md#safety-limits`.
//! Also the other resource the proxy's connections use up: open files.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tracing::{info, warn};

/// How often resident memory is read.
pub const EVERY: Duration = Duration::from_millis(250);

/// Whether requests are being shed, from readings of resident memory against the limit.
#[derive(Debug)]
pub struct Overload {
    limit: u64,
    shedding: AtomicBool,
    resident: Gauge,
    shedding_gauge: Gauge,
}

impl Overload {
    /// `limit` in bytes (non-zero); the gauges show the last reading and the state.
    pub fn new(limit: u64, resident: Gauge, shedding_gauge: Gauge) -> Arc<Self> {
        Arc::new(Self {
            limit,
            shedding: AtomicBool::new(false),
            resident,
            shedding_gauge,
        })
    }

    pub fn shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    /// Takes a reading of resident memory, in bytes: shedding starts above 95 % of the limit
    /// and stops below 90 % (between the two, it stays as it was).
    pub fn observe(&self, resident: u64) {
        self.resident
            .set(i64::try_from(resident).unwrap_or(i64::MAX));
        let (start, stop) = (self.limit / 20 * 19, self.limit / 10 * 9);
        let was = self.shedding();
        let now = if was {
            resident >= stop
        } else {
            resident > start
        };
        if now != was {
            self.shedding.store(now, Ordering::Relaxed);
            self.shedding_gauge.set(i64::from(now));
            if now {
                warn!(
                    resident,
                    limit = self.limit,
                    "memory pressure: shedding new requests"
                );
            } else {
                info!(
                    resident,
                    limit = self.limit,
                    "memory pressure over: taking requests"
                );
            }
        }
    }

    /// Reads resident memory every [`EVERY`], for as long as the proxy runs. A reading that
    /// fails (out of file descriptors, say) stops the shedding rather than keep a stale
    /// state: the proxy fails open.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let reading = resident_bytes();
            if reading.is_none() && !failing {
                warn!("cannot read resident memory from /proc/self/status: not shedding");
            }
            failing = reading.is_none();
            self.take(reading);
        }
    }

    /// Takes a reading, or its failure: then shedding stops.
    fn take(&self, reading: Option<u64>) {
        match reading {
            Some(r) => self.observe(r),
            None => {
                self.shedding.store(false, Ordering::Relaxed);
                self.shedding_gauge.set(0);
            }
        }
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does for every
/// program: each connection is a file (two when it goes upstream), and container runtimes may
/// start processes with a soft limit of 1,024. Warns when even the hard limit leaves less than
/// what `--max-connections` lets one listener take, each with a connection upstream (and 256
/// for the rest); past it, accepting fails until connections end.
/// Returns the limit in force.
pub fn raise_file_limit(max_connections: u32) -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .inspect_err(|e| warn!(error = %e, "reading the open-file limit"))
        .ok()?;
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                info!(from = soft, to = hard, "raised the open-file limit");
                hard
            }
            Err(e) => {
                warn!(error = %e, soft, hard, "raising the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    // A connection that goes upstream is two files; and 256 for the rest (listeners, xDS).
    if limit < 2 * u64::from(max_connections) + 256 {
        warn!(
            limit,
            max_connections,
            "the open-file limit is below --max-connections: past it, new connections wait in the kernel until others end"
        );
    }
    Some(limit)
}

/// The process's resident memory (`VmRSS`), in bytes.
pub fn resident_bytes() -> Option<u64> {
    proc_kb("/proc/self/status", "VmRSS")
}

/// Process `pid`'s resident memory (`VmRSS`), in bytes: for tests and tools that watch a
/// proxy from outside.
pub fn resident_bytes_of(pid: u32) -> Option<u64> {
    proc_kb(&format!("/proc/{pid}/status"), "VmRSS")
}

/// A `<field>: <n> kB` line of a `/proc` file (`/proc/<pid>/status`, `/proc/meminfo`), in
/// bytes.
pub fn proc_kb(path: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_above_95_percent_until_under_90() {
        let o = Overload::new(1000, Gauge::default(), Gauge::default());
        let mut states = Vec::new();
        for r in [900, 950, 951, 920, 900, 899, 940, 960] {
            o.observe(r);
            states.push(o.shedding());
        }
        assert_eq!(states, [false, false, true, true, true, false, false, true]);
        assert_eq!(o.shedding_gauge.get(), 1);
        assert_eq!(o.resident.get(), 960);
    }

    #[test]
    fn a_failed_reading_stops_the_shedding() {
        let o = Overload::new(1000, Gauge::default(), Gauge::default());
        o.take(Some(990));
        assert!(o.shedding());
        o.take(None);
        assert!(!o.shedding());
        assert_eq!(o.shedding_gauge.get(), 0);
        assert_eq!(o.resident.get(), 990, "the last reading stays");
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{Resource, getrlimit};
        let limit = raise_file_limit(100).expect("a limit");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!((soft, limit), (hard, hard));
    }

    #[test]
    fn reads_its_own_resident_memory() {
        let r = resident_bytes().expect("VmRSS on Linux");
        assert_eq!(
            resident_bytes_of(std::process::id()).map(|o| o > 1024 * 1024),
            Some(true)
        );
        assert!(r > 1024 * 1024, "{r} bytes");
    }
}
