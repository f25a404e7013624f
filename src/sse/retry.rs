//! The reconnection policy: how long a feed waits before its next connection attempt.
//!
//! Pure state, no clock and no sleeping: the caller reports what happened (a failure of some
//! class, how long the connection had been open) and gets a [`Duration`] back, so every rule is
//! unit-tested in microseconds. The random source is injected (a seeded `StdRng` in tests).
//!
//! The rules, as the feed configuration documents them for users (`[feed.backoff]`):
//! - `daemon` policy: the n-th consecutive failure waits
//!   `max(retry, min(max, max(initial, retry) * multiplier^(n-1)))` plus a random
//!   `0..jitter` fraction of that on top, where `retry` is the stream's reconnection time
//!   (`default_retry` until the stream sends `retry:`). A `Retry-After` header raises the delay;
//!   a client error waits at least `client_error_delay`; a connection that stayed open for
//!   `reset_after` resets the count.
//! - A routine close (a stream that delivered events, then ended cleanly) is no failure under
//!   either policy: the count resets and the next attempt waits the reconnection time
//!   ([`Backoff::routine_close`]).
//! - `browser` policy: exactly the reconnection time, no backoff, no jitter (WHATWG
//!   EventSource "reestablish the connection").
//! - Under both policies no delay is shorter than [`MIN_RECONNECT_DELAY`]: a server that
//!   sends `retry: 0` and closes at once must not turn a feed into a hot loop (ARCHITECTURE.md,
//!   "Hostile input and bounded resources": every loop has a floor).

use std::time::{Duration, SystemTime};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::options::{BackoffOptions, ClientOptions, Policy};

/// The longest reconnection time (from `retry:`) or `Retry-After` honoured. A server asking
/// for more (a `retry:` of 2^64 ms is syntactically valid) would otherwise silently park the
/// feed for ever while it looks "connecting"; a day is as long as any real server means.
pub const MAX_SERVER_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The shortest wait before any reconnection, whatever the policy, `retry:` or the backoff
/// settings say. A browser would reconnect at once after `retry: 0`; a daemon that does so
/// against a server that closes every response at once makes thousands of requests (and log
/// lines, and gap rows) a second.
pub const MIN_RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// What kind of failure a delay is computed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Network errors, EOF, idle timeouts, 5xx, 408, 429, parse errors, a rejected ID: the
    /// exponential backoff applies.
    Transient,
    /// Other 4xx, a wrong content type, a redirect loop: the backoff applies and the delay is at
    /// least `client_error_delay` (these rarely fix themselves quickly; never hammer the server).
    ClientError,
}

/// Reconnection state of one feed. See the module documentation for the rules.
///
/// The random source of a feed is a `SmallRng` (32 bytes): jitter needs no cryptographic
/// quality, and `StdRng` (ChaCha with its block buffer, about 330 bytes) in each of 10 000
/// feeds was 3 MiB for nothing.
#[derive(Debug, Clone)]
pub struct Backoff<R = SmallRng> {
    policy: Policy,
    config: BackoffOptions,
    client_error_delay: Duration,
    /// The stream's reconnection time: `default_retry` until a `retry:` field changes it.
    reconnection_time: Duration,
    /// Consecutive failures so far (the `n` of the formula counts this failure too).
    failures: u32,
    rng: R,
}

impl Backoff<SmallRng> {
    /// The policy of `feed`, with an RNG seeded from the OS so that feeds failing together do
    /// not reconnect together.
    pub fn for_feed(feed: &ClientOptions) -> Self {
        Backoff::new(feed, SmallRng::from_entropy())
    }
}

impl<R: Rng> Backoff<R> {
    /// The policy of `feed` with the given random source (seed it in tests).
    pub fn new(feed: &ClientOptions, rng: R) -> Self {
        Backoff {
            policy: feed.policy,
            config: feed.backoff.clone(),
            client_error_delay: feed.client_error_delay,
            reconnection_time: feed.default_retry.min(MAX_SERVER_DELAY),
            failures: 0,
            rng,
        }
    }

    /// The stream's reconnection time: no reconnection happens sooner (under both policies).
    pub fn reconnection_time(&self) -> Duration {
        self.reconnection_time
    }

    /// A `retry:` field (milliseconds) changes the reconnection time for all later
    /// reconnections, capped at [`MAX_SERVER_DELAY`].
    pub fn set_reconnection_time_ms(&mut self, ms: u64) {
        self.reconnection_time = Duration::from_millis(ms).min(MAX_SERVER_DELAY);
    }

    /// Consecutive failures counted so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// An open connection ended after `open_for`. If it stayed open at least `reset_after`, it
    /// was healthy: the failure count starts over, so the failure that ended it counts as the
    /// first one. Call before [`Backoff::next_delay`] for that failure.
    pub fn connection_closed(&mut self, open_for: Duration) {
        if open_for >= self.config.reset_after {
            self.failures = 0;
        }
    }

    /// An open connection delivered events and then ended cleanly (EOF): not a failure, since
    /// servers and proxies end healthy responses routinely. The failure count starts over and
    /// the next attempt waits exactly the reconnection time (never less than
    /// [`MIN_RECONNECT_DELAY`]), under both policies, as a browser would.
    pub fn routine_close(&mut self) -> Duration {
        self.failures = 0;
        self.reconnection_time.max(MIN_RECONNECT_DELAY)
    }

    /// Forgets the failure count (e.g. when an operator restarts the feed).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts one more consecutive failure and returns how long to wait before the next attempt.
    ///
    /// `retry_after` is the server's `Retry-After` (see [`parse_retry_after`]); it only raises
    /// the delay. Under the `browser` policy the answer is exactly the reconnection time:
    /// `retry_after` and `class` do not matter (the caller stops the feed on answers a browser
    /// would not retry).
    pub fn next_delay(&mut self, class: FailureClass, retry_after: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if self.policy == Policy::Browser {
            return self.reconnection_time.max(MIN_RECONNECT_DELAY);
        }
        let base = exponential(&self.config, self.reconnection_time, self.failures);
        let mut delay = base.saturating_add(self.jitter(base));
        if let Some(after) = retry_after {
            delay = delay.max(after.min(MAX_SERVER_DELAY));
        }
        if class == FailureClass::ClientError {
            delay = delay.max(self.client_error_delay);
        }
        delay.max(MIN_RECONNECT_DELAY)
    }

    /// A random `0..jitter` fraction of `base` (nothing, and no random number drawn, when
    /// `jitter` is 0, which keeps test sequences simple).
    fn jitter(&mut self, base: Duration) -> Duration {
        let fraction = if self.config.jitter.is_finite() {
            self.config.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        if fraction == 0.0 || base.is_zero() {
            return Duration::ZERO;
        }
        let extra = base.as_secs_f64() * fraction * self.rng.gen::<f64>();
        Duration::try_from_secs_f64(extra).unwrap_or(Duration::ZERO)
    }
}

/// The delay of the `n`-th consecutive failure (`n >= 1`) without jitter:
/// `max(retry, min(max, max(initial, retry) * multiplier^(n-1)))`.
///
/// Computed in floating point and clamped before converting back, so huge `n` or multipliers
/// saturate at `max` instead of overflowing. A multiplier below 1 or not finite counts as 1
/// (validation rejects those; this keeps the function total).
pub fn exponential(config: &BackoffOptions, retry: Duration, n: u32) -> Duration {
    let start = config.initial.max(retry);
    let multiplier = if config.multiplier.is_finite() && config.multiplier >= 1.0 {
        config.multiplier
    } else {
        1.0
    };
    let exponent = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
    let scaled = start.as_secs_f64() * multiplier.powi(exponent);
    let capped = if scaled.is_finite() && scaled < config.max.as_secs_f64() {
        // `scaled` is finite, non-negative and below `max` here, so the conversion holds.
        Duration::try_from_secs_f64(scaled).unwrap_or(config.max)
    } else {
        config.max
    };
    retry.max(capped)
}

/// Parses a `Retry-After` header value: delay-seconds (`120`) or an HTTP date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`, also the obsolete formats `httpdate` accepts), relative to
/// `now`. A date in the past means no extra wait (`Some(0)`); anything else unparseable is
/// ignored (`None`). Capped at [`MAX_SERVER_DELAY`].
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let delay = if value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits but too large for u64: "as long as possible".
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_SERVER_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;

    /// The tests seed a `StdRng` (their expected jitter values were computed with it).
    type Backoff = super::Backoff<StdRng>;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// initial 1 s, max 60 s, multiplier 2, no jitter, reset after 60 s, retry 3 s.
    fn feed() -> ClientOptions {
        let mut f = ClientOptions::new("t", "http://example.org/");
        f.backoff = BackoffOptions {
            initial: ms(1000),
            max: ms(60_000),
            multiplier: 2.0,
            jitter: 0.0,
            reset_after: ms(60_000),
        };
        f.default_retry = ms(3000);
        f.client_error_delay = ms(30_000);
        f
    }

    fn backoff(f: &ClientOptions) -> Backoff {
        Backoff::new(f, StdRng::seed_from_u64(7))
    }

    fn delays(b: &mut Backoff, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| b.next_delay(FailureClass::Transient, None).as_millis() as u64)
            .collect()
    }

    #[test]
    fn formula_starts_at_the_larger_of_initial_and_retry_and_doubles_up_to_max() {
        let mut b = backoff(&feed());
        // max(initial 1 s, retry 3 s) = 3 s, doubling, capped at 60 s.
        assert_eq!(
            delays(&mut b, 7),
            vec![3000, 6000, 12_000, 24_000, 48_000, 60_000, 60_000]
        );
        assert_eq!(b.failures(), 7);
    }

    #[test]
    fn initial_larger_than_retry_starts_the_sequence() {
        let mut f = feed();
        f.backoff.initial = ms(5000);
        let mut b = backoff(&f);
        assert_eq!(delays(&mut b, 3), vec![5000, 10_000, 20_000]);
    }

    #[test]
    fn retry_is_a_floor_even_above_max() {
        let mut f = feed();
        f.backoff.max = ms(2000);
        let mut b = backoff(&f);
        // min(max 2 s, 3 s * 2^k) = 2 s, but never below retry = 3 s.
        assert_eq!(delays(&mut b, 3), vec![3000, 3000, 3000]);
        b.set_reconnection_time_ms(100);
        // Now retry 100 ms: max(initial 1 s, 100 ms) * 2^3 = 8 s, capped at 2 s.
        assert_eq!(delays(&mut b, 1), vec![2000]);
    }

    #[test]
    fn retry_field_changes_later_delays() {
        let mut b = backoff(&feed());
        b.set_reconnection_time_ms(10_000);
        assert_eq!(b.reconnection_time(), ms(10_000));
        assert_eq!(delays(&mut b, 2), vec![10_000, 20_000]);
        b.set_reconnection_time_ms(500);
        // n = 3: max(initial 1 s, 500 ms) * 4.
        assert_eq!(delays(&mut b, 1), vec![4000]);
    }

    #[test]
    fn huge_retry_is_capped_at_a_day() {
        let mut b = backoff(&feed());
        b.set_reconnection_time_ms(u64::MAX);
        assert_eq!(b.reconnection_time(), MAX_SERVER_DELAY);
        assert_eq!(
            b.next_delay(FailureClass::Transient, None),
            MAX_SERVER_DELAY
        );
    }

    #[test]
    fn many_failures_saturate_without_overflow() {
        let mut f = feed();
        f.backoff.multiplier = 1e300;
        let mut b = backoff(&f);
        for _ in 0..5 {
            b.next_delay(FailureClass::Transient, None);
        }
        assert_eq!(b.next_delay(FailureClass::Transient, None), ms(60_000));
        assert_eq!(exponential(&f.backoff, ms(3000), u32::MAX), ms(60_000));
    }

    #[test]
    fn multiplier_one_keeps_the_delay_constant() {
        let mut f = feed();
        f.backoff.multiplier = 1.0;
        let mut b = backoff(&f);
        assert_eq!(delays(&mut b, 4), vec![3000, 3000, 3000, 3000]);
    }

    #[test]
    fn jitter_adds_at_most_the_fraction_on_top_and_is_reproducible_with_a_seed() {
        let mut f = feed();
        f.backoff.jitter = 0.5;
        f.backoff.multiplier = 1.0;
        let mut a = Backoff::new(&f, StdRng::seed_from_u64(42));
        let mut b = Backoff::new(&f, StdRng::seed_from_u64(42));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let d = a.next_delay(FailureClass::Transient, None);
            assert_eq!(d, b.next_delay(FailureClass::Transient, None));
            assert!(d >= ms(3000) && d < ms(4500), "{d:?}");
            seen.insert(d);
        }
        assert!(seen.len() > 100, "jitter should spread delays");
    }

    #[test]
    fn jitter_out_of_range_is_clamped() {
        let mut f = feed();
        f.backoff.jitter = 7.0;
        let mut b = backoff(&f);
        for _ in 0..50 {
            b.reset();
            let d = b.next_delay(FailureClass::Transient, None);
            assert!(d >= ms(3000) && d < ms(6000), "{d:?}");
        }
        f.backoff.jitter = f64::NAN;
        let mut b = backoff(&f);
        assert_eq!(b.next_delay(FailureClass::Transient, None), ms(3000));
    }

    #[test]
    fn retry_after_raises_but_never_lowers() {
        let mut b = backoff(&feed());
        assert_eq!(
            b.next_delay(FailureClass::Transient, Some(ms(10_000))),
            ms(10_000)
        );
        // Second failure: 6 s from the formula beats a Retry-After of 1 s.
        assert_eq!(
            b.next_delay(FailureClass::Transient, Some(ms(1000))),
            ms(6000)
        );
        // Capped.
        let d = b.next_delay(FailureClass::Transient, Some(Duration::from_secs(u64::MAX)));
        assert_eq!(d, MAX_SERVER_DELAY);
    }

    #[test]
    fn client_errors_wait_at_least_client_error_delay() {
        let mut b = backoff(&feed());
        assert_eq!(b.next_delay(FailureClass::ClientError, None), ms(30_000));
        // 2nd: 6 s < 30 s.
        assert_eq!(b.next_delay(FailureClass::ClientError, None), ms(30_000));
        for _ in 0..3 {
            b.next_delay(FailureClass::ClientError, None);
        }
        // 6th: min(60 s, 3 s * 32) = 60 s > 30 s.
        assert_eq!(b.next_delay(FailureClass::ClientError, None), ms(60_000));
    }

    #[test]
    fn a_connection_open_for_reset_after_resets_the_count() {
        let mut b = backoff(&feed());
        assert_eq!(delays(&mut b, 3), vec![3000, 6000, 12_000]);
        // Short-lived connection: still counting.
        b.connection_closed(ms(59_999));
        assert_eq!(delays(&mut b, 1), vec![24_000]);
        // Healthy connection: the failure that ended it is the first again.
        b.connection_closed(ms(60_000));
        assert_eq!(b.failures(), 0);
        assert_eq!(delays(&mut b, 2), vec![3000, 6000]);
    }

    #[test]
    fn a_routine_close_waits_the_reconnection_time_and_resets_the_count() {
        let mut b = backoff(&feed());
        assert_eq!(delays(&mut b, 3), vec![3000, 6000, 12_000]);
        b.set_reconnection_time_ms(500);
        assert_eq!(b.routine_close(), ms(500));
        assert_eq!(b.failures(), 0);
        // Routine closes never escalate; the next failure starts the sequence again.
        assert_eq!(b.routine_close(), ms(500));
        assert_eq!(delays(&mut b, 2), vec![1000, 2000]);
        // The floor holds for `retry: 0` too.
        b.set_reconnection_time_ms(0);
        assert_eq!(b.routine_close(), MIN_RECONNECT_DELAY);
    }

    #[test]
    fn browser_policy_waits_exactly_the_reconnection_time() {
        let mut f = feed();
        f.policy = Policy::Browser;
        f.backoff.jitter = 1.0;
        let mut b = backoff(&f);
        for _ in 0..5 {
            assert_eq!(
                b.next_delay(FailureClass::Transient, Some(ms(99_000))),
                ms(3000)
            );
        }
        assert_eq!(b.next_delay(FailureClass::ClientError, None), ms(3000));
        b.set_reconnection_time_ms(250);
        assert_eq!(b.next_delay(FailureClass::Transient, None), ms(250));
    }

    #[test]
    fn no_policy_reconnects_sooner_than_the_floor() {
        // `retry: 0` from the stream, and backoff settings as small as validation allows.
        let mut f = feed();
        f.backoff.initial = Duration::from_nanos(1);
        f.backoff.max = Duration::from_nanos(1);
        f.backoff.multiplier = 1.0;
        for policy in [Policy::Daemon, Policy::Browser] {
            f.policy = policy;
            let mut b = backoff(&f);
            b.set_reconnection_time_ms(0);
            for class in [FailureClass::Transient, FailureClass::ClientError] {
                let mut g = f.clone();
                g.client_error_delay = Duration::ZERO;
                let mut c = backoff(&g);
                c.set_reconnection_time_ms(0);
                assert_eq!(
                    c.next_delay(class, Some(Duration::ZERO)),
                    MIN_RECONNECT_DELAY
                );
            }
            assert_eq!(delays(&mut b, 3), vec![100, 100, 100], "{policy:?}");
        }
    }

    #[test]
    fn default_config_values() {
        // The documented defaults: 3 s retry floor, 1 s initial -> 3, 6, 12, ... 60 s, +0..30 %.
        let f = ClientOptions::new("t", "http://example.org/");
        let mut b = Backoff::new(&f, StdRng::seed_from_u64(1));
        let d = b.next_delay(FailureClass::Transient, None);
        assert!(d >= ms(3000) && d < ms(3900), "{d:?}");
    }

    #[test]
    fn retry_after_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("120", now), Some(ms(120_000)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_SERVER_DELAY)
        );
    }

    #[test]
    fn retry_after_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(ms(30_000))
        );
        // RFC 850 form.
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", now),
            Some(ms(60_000))
        );
        // In the past: no extra wait.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        let now = SystemTime::now();
        for v in ["", "  ", "-5", "1.5", "soon", "12s", "Wed, 99 Foo 2015"] {
            assert_eq!(parse_retry_after(v, now), None, "{v:?}");
        }
    }
}
