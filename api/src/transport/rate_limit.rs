//! The per-caller rate limit: `N/s`, `N/m` or `N/h`, with a
//! burst of N, kept by governor's keyed GCRA limiter. A caller is its
//! token's `sub`, else its client address.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::auth::Caller;

/// A rate: `count` requests per `period`, in bursts of up to `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per period (and the burst).
    pub count: NonZeroU32,
    /// The period.
    pub period: Duration,
}

impl FromStr for RateLimit {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let wrong = || format!("{text:?}: write a rate as N/s, N/m or N/h, e.g. 50/s");
        let (count, unit) = text.trim().split_once('/').ok_or_else(wrong)?;
        let count: NonZeroU32 = count.trim().parse().map_err(|_| wrong())?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(wrong()),
        };
        Ok(Self { count, period })
    }
}

/// Every caller's budget.
#[derive(Debug)]
pub struct RateLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl RateLimiter {
    /// A limiter allowing `limit` to each caller.
    pub fn new(limit: RateLimit) -> Self {
        let quota = Quota::with_period(limit.period / limit.count.get())
            .unwrap_or_else(|| Quota::per_second(limit.count))
            .allow_burst(limit.count);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one request from the budget of `caller` (coming from
    /// `client`), or says how long until it may try again.
    pub fn check(&self, caller: &Caller, client: Option<IpAddr>) -> Result<(), Duration> {
        let key = match (&caller.subject, client) {
            (Some(subject), _) => format!("sub:{subject}"),
            (None, Some(client)) => format!("ip:{client}"),
            (None, None) => "unknown".to_owned(),
        };
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets callers whose budget is full again (called now and then, so
    /// that callers who went away cost nothing).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_read_and_wrong_ones_explained() {
        assert_eq!(
            "50/s".parse::<RateLimit>(),
            Ok(RateLimit {
                count: NonZeroU32::new(50).unwrap(),
                period: Duration::from_secs(1)
            })
        );
        assert_eq!(
            "3/m".parse::<RateLimit>().unwrap().period,
            Duration::from_secs(60)
        );
        for wrong in ["", "50", "0/s", "x/s", "5/d", "-1/s"] {
            let error = wrong.parse::<RateLimit>().unwrap_err();
            assert!(error.contains("N/s, N/m or N/h"), "{wrong}: {error}");
        }
    }

    #[test]
    fn each_caller_has_a_budget_of_its_own() {
        let limiter = RateLimiter::new("2/m".parse().unwrap());
        let mut alice = Caller::anon();
        alice.subject = Some("alice".into());
        let mut bob = Caller::anon();
        bob.subject = Some("bob".into());
        assert!(limiter.check(&alice, None).is_ok());
        assert!(limiter.check(&alice, None).is_ok());
        let wait = limiter.check(&alice, None).unwrap_err();
        assert!(
            wait > Duration::from_secs(20) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert!(limiter.check(&bob, None).is_ok());
    }
}
