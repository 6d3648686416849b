//! Jittered exponential backoff, for reconnecting to the controller and to the CA.

use std::time::Duration;

/// Each wait is drawn from the upper half of the current step, so that clients restarted
/// together spread out.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    /// 10 ms doubling to 15 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(10), Duration::from_secs(15))
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            step: base,
            base,
            cap,
        }
    }

    /// The next wait: the current step (doubling up to the cap), drawn from its upper half.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.cap);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }

    pub fn reset(&mut self) {
        self.step = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_to_a_cap() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10));
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.next_delay();
        }
        assert!(last >= Duration::from_millis(7500) && last <= Duration::from_secs(15));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }
}
