//! Reconnect backoff: exponential growth, jitter within bounds, cap, reset.

use std::time::Duration;

use tandem::transport::Backoff;

#[test]
fn delays_grow_exponentially_within_jitter_bounds_then_cap() {
    let mut b = Backoff::new(100, 1_000);
    let bases_ms = [100u64, 200, 400, 800, 1_000, 1_000, 1_000];
    for _ in 0..50 {
        b.reset();
        for base_ms in bases_ms {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(base_ms / 2) && d <= Duration::from_millis(base_ms),
                "delay {d:?} outside [{}, {base_ms}] ms",
                base_ms / 2
            );
        }
    }
    // Far past the cap nothing overflows and the cap holds.
    for _ in 0..1_000 {
        assert!(b.next_delay() <= Duration::from_millis(1_000));
    }
}

#[test]
fn jitter_spreads_delays() {
    let mut b = Backoff::new(1_000, 1_000);
    let delays: std::collections::BTreeSet<Duration> = (0..100).map(|_| b.next_delay()).collect();
    assert!(delays.len() > 10, "only {} distinct delays", delays.len());
}

#[test]
fn reset_starts_over() {
    let mut b = Backoff::new(10, 10_000);
    for _ in 0..10 {
        b.next_delay();
    }
    assert!(b.next_delay() >= Duration::from_millis(5_000));
    b.reset();
    assert!(b.next_delay() <= Duration::from_millis(10));
}
