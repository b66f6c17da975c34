//! Limits on calls to customers' KMS keys: a token bucket per tenant and one
//! for the whole server. A flood of cold unwraps for one tenant is answered
//! RESOURCE_EXHAUSTED here instead of exhausting that customer's KMS request
//! quota (shared with their own workloads) or starving other tenants. Only
//! provider calls draw tokens: cache hits are never limited, and neither is
//! the in-process platform keyring, which has no quota to protect.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

/// Calls per second and burst size; a rate of 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub per_second: u32,
    pub burst: u32,
}

impl Limit {
    pub const UNLIMITED: Self = Self {
        per_second: 0,
        burst: 0,
    };
}

impl QuotaSettings {
    /// No limit at all (benchmarks, tests that make keys in bulk).
    pub const UNLIMITED: Self = Self {
        tenant: Limit::UNLIMITED,
        global: Limit::UNLIMITED,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSettings {
    pub tenant: Limit,
    pub global: Limit,
}

impl Default for QuotaSettings {
    /// Well under AWS KMS's smallest shared quota (5,500 requests/s per
    /// account and region): one tenant cannot use a customer's whole quota.
    fn default() -> Self {
        Self {
            tenant: Limit {
                per_second: 100,
                burst: 200,
            },
            global: Limit {
                per_second: 2000,
                burst: 4000,
            },
        }
    }
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaScope {
    Tenant,
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(self))]
pub struct QuotaExceeded {
    pub scope: QuotaScope,
    pub tenant_id: String,
    pub limit: Limit,
    pub retry_after: Duration,
}

fn describe(e: &QuotaExceeded) -> String {
    let whose = match e.scope {
        QuotaScope::Tenant => format!("tenant '{}'", e.tenant_id),
        QuotaScope::Global => "this keybroker server".to_owned(),
    };
    format!(
        "{whose} is over its KMS call quota ({} calls/s, burst {}); retry after {} ms. \
         Keys already in the cache are still served",
        e.limit.per_second,
        e.limit.burst,
        e.retry_after.as_millis()
    )
}

/// The earliest retry, rounded up to whole milliseconds and at least
/// [`MIN_RETRY_DELAY`]: a sub-millisecond `RetryInfo` delay is one no client
/// can honour, and retrying at once would only be refused again.
fn retry_delay(wait: Duration) -> Duration {
    let ms = u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    Duration::from_millis(ms).max(MIN_RETRY_DELAY)
}

/// Shortest delay a quota refusal asks for.
pub const MIN_RETRY_DELAY: Duration = Duration::from_millis(10);

fn quota(limit: Limit) -> Option<Quota> {
    let rate = NonZeroU32::new(limit.per_second)?;
    let burst = NonZeroU32::new(limit.burst).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// The limiters of one server.
#[derive(Debug)]
pub struct ProviderQuota {
    settings: QuotaSettings,
    tenants: Option<DefaultKeyedRateLimiter<String>>,
    global: Option<DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl ProviderQuota {
    pub fn new(settings: QuotaSettings) -> Self {
        Self {
            settings,
            tenants: quota(settings.tenant).map(DefaultKeyedRateLimiter::keyed),
            global: quota(settings.global).map(DefaultDirectRateLimiter::direct),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one token for a provider call on behalf of `tenant_id`. The
    /// tenant's bucket is checked first so a flooding tenant is refused
    /// without draining the shared bucket.
    pub fn acquire(&self, tenant_id: &str) -> Result<(), QuotaExceeded> {
        let refuse = |scope, limit, earliest: governor::NotUntil<_>| QuotaExceeded {
            scope,
            tenant_id: tenant_id.to_owned(),
            limit,
            retry_after: retry_delay(earliest.wait_time_from(self.clock.now())),
        };
        if let Some(tenants) = &self.tenants {
            tenants
                .check_key(&tenant_id.to_owned())
                .map_err(|e| refuse(QuotaScope::Tenant, self.settings.tenant, e))?;
        }
        if let Some(global) = &self.global {
            global
                .check()
                .map_err(|e| refuse(QuotaScope::Global, self.settings.global, e))?;
        }
        Ok(())
    }

    /// Forgets buckets that are full again (idle tenants); keeps the map at
    /// the size of the recently active tenants.
    pub fn forget_idle(&self) {
        if let Some(tenants) = &self.tenants {
            tenants.retain_recent();
            tenants.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_bucket_refuses_past_burst_and_isolates_tenants() {
        let quota = ProviderQuota::new(QuotaSettings {
            tenant: Limit {
                per_second: 1,
                burst: 3,
            },
            global: Limit::UNLIMITED,
        });
        for _ in 0..3 {
            quota.acquire("acme").unwrap();
        }
        let refused = quota.acquire("acme").unwrap_err();
        assert_eq!(refused.scope, QuotaScope::Tenant);
        assert!(refused.retry_after > Duration::ZERO);
        assert!(refused.to_string().contains("tenant 'acme'"), "{refused}");
        quota.acquire("globex").unwrap();
    }

    #[test]
    fn global_bucket_is_shared() {
        let quota = ProviderQuota::new(QuotaSettings {
            tenant: Limit::UNLIMITED,
            global: Limit {
                per_second: 1,
                burst: 2,
            },
        });
        quota.acquire("a").unwrap();
        quota.acquire("b").unwrap();
        assert_eq!(quota.acquire("c").unwrap_err().scope, QuotaScope::Global);
    }

    #[test]
    fn retry_delays_are_whole_milliseconds_a_client_can_honour() {
        assert_eq!(retry_delay(Duration::from_micros(300)), MIN_RETRY_DELAY);
        assert_eq!(retry_delay(Duration::ZERO), MIN_RETRY_DELAY);
        assert_eq!(
            retry_delay(Duration::from_micros(25_001)),
            Duration::from_millis(26)
        );
        assert_eq!(retry_delay(Duration::from_secs(2)), Duration::from_secs(2));
    }
}
