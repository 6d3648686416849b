//! Jittered exponential backoff: for reconnecting to the controller and to the CA, and
//! between a request's retries.

use std::time::Duration;

/// Each wait is drawn from the current step, which doubles from the base up to the cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
    base: Duration,
    cap: Duration,
    jitter: Jitter,
}

/// How much of the step a wait is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// The upper half: clients restarted together spread out, and none retries at once.
    UpperHalf,
    /// All of it (0 to the step), as Envoy's and gRPC's retry backoff.
    Full,
}

impl Default for Backoff {
    /// 10 ms doubling to 15 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(10), Duration::from_secs(15))
    }
}

impl Backoff {
    /// Waits drawn from the upper half of each step.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            step: base,
            base,
            cap,
            jitter: Jitter::UpperHalf,
        }
    }

    /// Waits drawn from all of each step.
    pub fn full_jitter(base: Duration, cap: Duration) -> Self {
        Self {
            jitter: Jitter::Full,
            ..Self::new(base, cap)
        }
    }

    /// The next wait: the current step (doubling up to the cap), jittered.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step.min(self.cap);
        self.step = step.saturating_mul(2).min(self.cap);
        let low = match self.jitter {
            Jitter::UpperHalf => 0.5,
            Jitter::Full => 0.0,
        };
        step.mul_f64(rand::random_range(low..=1.0))
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

    #[test]
    fn full_jitter_draws_from_the_whole_step() {
        let (base, cap) = (Duration::from_millis(25), Duration::from_millis(100));
        let mut b = Backoff::full_jitter(base, cap);
        // Steps 25, 50, 100, 100: each wait is within its step, and some fall in the lower
        // half, which the upper-half mode never draws.
        let steps = [25, 50, 100, 100].map(Duration::from_millis);
        let mut low = 0;
        for _ in 0..200 {
            b.reset();
            for step in steps {
                let d = b.next_delay();
                assert!(d <= step, "{d:?} over the step {step:?}");
                low += usize::from(d < step / 2);
            }
        }
        assert!(low > 100, "{low} of 800 waits in the lower half");
        // A base over the cap waits at most the cap.
        let mut b = Backoff::full_jitter(Duration::from_secs(5), Duration::from_secs(1));
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}
