//! Which repeating warnings may get a log line now.
//!
//! In: occurrences of an event (a name like `peer_unanswered`) about a key (a peer, a record)
//! at `now`, and clears when the condition ends. Out: whether to log this one, with the count
//! of occurrences held back since the last line. The first occurrence logs at once, the next
//! ones within the interval are only counted, the first one after it logs with that count. At
//! 1000 nodes one broken peer then costs each node one line per interval, not one per check.
//! Sans-IO: the caller owns the clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The limiter (see the module doc).
#[derive(Debug)]
pub struct Repeats {
    interval: Duration,
    seen: HashMap<(&'static str, String), Seen>,
}

#[derive(Debug)]
struct Seen {
    logged: Instant,
    held: u64,
}

impl Repeats {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: HashMap::new(),
        }
    }

    /// One more occurrence of `event` about `key` at `now`. `Some(n)`: log it now, saying it
    /// happened `n` more times since its last line; `None`: counted, no line.
    pub fn hit(&mut self, event: &'static str, key: &str, now: Instant) -> Option<u64> {
        match self.seen.get_mut(&(event, key.to_string())) {
            Some(s) if now.saturating_duration_since(s.logged) < self.interval => {
                s.held += 1;
                None
            }
            Some(s) => {
                let held = std::mem::take(&mut s.held);
                s.logged = now;
                Some(held)
            }
            None => {
                self.seen.insert(
                    (event, key.to_string()),
                    Seen {
                        logged: now,
                        held: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// The condition ended (the peer answers, the record is accepted): the next occurrence
    /// logs at once. Returns how many occurrences were held back without a line.
    pub fn clear(&mut self, event: &'static str, key: &str) -> Option<u64> {
        self.seen.remove(&(event, key.to_string())).map(|s| s.held)
    }

    /// Keys of `event` that are going on.
    pub fn keys(&self, event: &'static str) -> Vec<String> {
        self.seen
            .keys()
            .filter(|(e, _)| *e == event)
            .map(|(_, k)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_give_one_line_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut r = Repeats::new(Duration::from_secs(60));
        assert_eq!(r.hit("peer_unanswered", "b", t0), Some(0), "first: at once");
        for s in 1..60 {
            assert_eq!(
                r.hit("peer_unanswered", "b", t0 + Duration::from_secs(s)),
                None
            );
        }
        // Another key and another event are separate.
        assert_eq!(r.hit("peer_unanswered", "c", t0), Some(0));
        assert_eq!(r.hit("record_refused", "b", t0), Some(0));
        assert_eq!(
            r.hit("peer_unanswered", "b", t0 + Duration::from_secs(60)),
            Some(59),
            "the next line says how many were held back"
        );
        assert_eq!(
            r.hit("peer_unanswered", "b", t0 + Duration::from_secs(61)),
            None
        );
        assert!(r.keys("peer_unanswered").contains(&"b".to_string()));
        assert_eq!(r.clear("peer_unanswered", "b"), Some(1));
        assert!(!r.keys("peer_unanswered").contains(&"b".to_string()));
        assert_eq!(r.clear("peer_unanswered", "b"), None);
        assert_eq!(
            r.hit("peer_unanswered", "b", t0 + Duration::from_secs(62)),
            Some(0),
            "after it cleared, the next occurrence logs at once"
        );
        let mut keys = r.keys("peer_unanswered");
        keys.sort();
        assert_eq!(keys, vec!["b".to_string(), "c".to_string()]);
    }

    #[test]
    fn a_clock_going_backwards_holds_the_line() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut r = Repeats::new(Duration::from_secs(60));
        assert_eq!(r.hit("x", "k", t0), Some(0));
        assert_eq!(r.hit("x", "k", t0 - Duration::from_secs(50)), None);
    }
}
