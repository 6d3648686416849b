//! The retry budget: retries may add at most `ratio` of the requests sent over the last
//! `window`, plus a floor of `min_per_sec` retries per second, so retries cannot multiply the
//! load on a struggling backend.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BudgetConfig {
    pub ratio: f64,
    pub min_per_sec: u32,
    pub window_secs: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_sec: 10,
            window_secs: 10,
        }
    }
}

#[derive(Debug)]
struct Window {
    /// Per one-second slot: (requests, retries).
    slots: Vec<(u64, u64)>,
    /// The second the newest slot belongs to.
    head: u64,
}

#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    start: Instant,
    window: Mutex<Window>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(BudgetConfig::default())
    }
}

impl RetryBudget {
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            start: Instant::now(),
            window: Mutex::new(Window {
                slots: vec![(0, 0); config.window_secs.max(1) as usize],
                head: 0,
            }),
        }
    }

    fn with<T>(&self, now: Instant, f: impl FnOnce(&mut Window, usize) -> T) -> Option<T> {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let mut w = self.window.lock().ok()?;
        let n = w.slots.len() as u64;
        if sec > w.head {
            // Clear the slots of the seconds that passed.
            for s in (w.head + 1)..=sec.min(w.head + n) {
                let i = (s % n) as usize;
                w.slots[i] = (0, 0);
            }
            w.head = sec;
        }
        let i = (sec % n) as usize;
        Some(f(&mut w, i))
    }

    /// Requests counted over the window.
    pub fn requests(&self, now: Instant) -> u64 {
        self.with(now, |w, _| w.slots.iter().map(|(r, _)| r).sum())
            .unwrap_or(0)
    }

    /// Counts a request (its first try).
    pub fn deposit(&self, now: Instant) {
        self.with(now, |w, i| w.slots[i].0 += 1);
    }

    /// Takes a retry from the budget if there is room.
    pub fn withdraw(&self, now: Instant) -> bool {
        let c = self.config;
        self.with(now, |w, i| {
            let (requests, retries) = w
                .slots
                .iter()
                .fold((0u64, 0u64), |(a, b), (r, t)| (a + r, b + t));
            let allowed =
                c.ratio * requests as f64 + f64::from(c.min_per_sec) * f64::from(c.window_secs);
            if (retries as f64) < allowed {
                w.slots[i].1 += 1;
                true
            } else {
                false
            }
        })
        .unwrap_or(false)
    }

    pub fn window(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.window_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_ratio_plus_the_floor() {
        let b = RetryBudget::new(BudgetConfig {
            ratio: 0.2,
            min_per_sec: 1,
            window_secs: 10,
        });
        let now = b.start;
        for _ in 0..100 {
            b.deposit(now);
        }
        // 20 % of 100 plus 1/s over 10 s.
        let granted = (0..100).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 30);
    }

    #[test]
    fn the_window_slides() {
        let b = RetryBudget::new(BudgetConfig {
            ratio: 0.0,
            min_per_sec: 1,
            window_secs: 2,
        });
        let t0 = b.start;
        assert!(b.withdraw(t0));
        assert!(b.withdraw(t0));
        assert!(!b.withdraw(t0));
        // Two seconds on, the old retries have left the window.
        assert!(b.withdraw(t0 + Duration::from_secs(2)));
        assert_eq!(b.window(), Duration::from_secs(2));
    }
}
