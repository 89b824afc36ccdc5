//! Rate limiting of repeated log lines: the agent's loop meets the same failure on every round
//! (a manifest directory that went away, unreadable addresses, a full map); the first occurrence
//! is logged at once, repeats at most once per period with the number left out in between.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// How often the same message may be logged again.
pub const PERIOD: Duration = Duration::from_secs(60);

/// Remembers when each message (by key) was last logged.
#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    last: HashMap<String, (Instant, u64)>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(PERIOD)
    }
}

impl LogLimiter {
    /// A limiter letting each key through once per `period`.
    pub fn new(period: Duration) -> Self {
        Self { period, last: HashMap::new() }
    }

    /// Whether the message `key` may be logged at `now`: `Some(n)` with the number of times it
    /// was held back since it was last logged, `None` to stay quiet.
    pub fn allow(&mut self, key: &str, now: Instant) -> Option<u64> {
        match self.last.get_mut(key) {
            Some((at, held)) if now.duration_since(*at) < self.period => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                // Bounded: keys of errors that stopped are forgotten when the table grows.
                if self.last.len() >= 1024 {
                    let period = self.period;
                    self.last.retain(|_, (at, _)| now.duration_since(*at) < period);
                }
                self.last.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }

    /// Forgets `key` (the failure stopped): its next occurrence is logged at once.
    pub fn clear(&mut self, key: &str) {
        self.last.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_held_back_and_counted() {
        let mut l = LogLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(l.allow("a", t0), Some(0));
        assert_eq!(l.allow("a", t0 + Duration::from_millis(500)), None);
        assert_eq!(l.allow("a", t0 + Duration::from_secs(1)), None);
        // Another message is not held back by the first.
        assert_eq!(l.allow("b", t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(l.allow("a", t0 + Duration::from_secs(61)), Some(2));
        assert_eq!(l.allow("a", t0 + Duration::from_secs(62)), None);
        l.clear("a");
        assert_eq!(l.allow("a", t0 + Duration::from_secs(63)), Some(0));
    }
}
