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

/// The `quota_*` settings. The defaults are well under AWS KMS's smallest
/// shared quota (5,500 requests/s per account and region): one tenant
/// cannot use a customer's whole quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct QuotaSettings {
    /// KMS calls per second one tenant may cause; 0 = unlimited.
    #[arg(
        id = "quota_tenant_rate",
        long = "quota-tenant-rate",
        env = "KEYBROKER_QUOTA_TENANT_RATE",
        default_value = "100"
    )]
    pub tenant_rate: u32,
    /// Burst of a tenant's KMS calls.
    #[arg(
        id = "quota_tenant_burst",
        long = "quota-tenant-burst",
        env = "KEYBROKER_QUOTA_TENANT_BURST",
        default_value = "200"
    )]
    pub tenant_burst: u32,
    /// KMS calls per second of the whole server; 0 = unlimited.
    #[arg(
        id = "quota_global_rate",
        long = "quota-global-rate",
        env = "KEYBROKER_QUOTA_GLOBAL_RATE",
        default_value = "2000"
    )]
    pub global_rate: u32,
    /// Burst of the server's KMS calls.
    #[arg(
        id = "quota_global_burst",
        long = "quota-global-burst",
        env = "KEYBROKER_QUOTA_GLOBAL_BURST",
        default_value = "4000"
    )]
    pub global_burst: u32,
}

impl QuotaSettings {
    /// No limit at all (benchmarks, tests that make keys in bulk).
    pub const UNLIMITED: Self = Self::new(Limit::UNLIMITED, Limit::UNLIMITED);

    pub const fn new(tenant: Limit, global: Limit) -> Self {
        Self {
            tenant_rate: tenant.per_second,
            tenant_burst: tenant.burst,
            global_rate: global.per_second,
            global_burst: global.burst,
        }
    }

    pub fn tenant(&self) -> Limit {
        Limit {
            per_second: self.tenant_rate,
            burst: self.tenant_burst,
        }
    }

    pub fn global(&self) -> Limit {
        Limit {
            per_second: self.global_rate,
            burst: self.global_burst,
        }
    }
}

impl Default for QuotaSettings {
    fn default() -> Self {
        crate::settings::defaults()
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
            tenants: quota(settings.tenant()).map(DefaultKeyedRateLimiter::keyed),
            global: quota(settings.global()).map(DefaultDirectRateLimiter::direct),
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
                .map_err(|e| refuse(QuotaScope::Tenant, self.settings.tenant(), e))?;
        }
        if let Some(global) = &self.global {
            global
                .check()
                .map_err(|e| refuse(QuotaScope::Global, self.settings.global(), e))?;
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
        let quota = ProviderQuota::new(QuotaSettings::new(
            Limit {
                per_second: 1,
                burst: 3,
            },
            Limit::UNLIMITED,
        ));
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
        let quota = ProviderQuota::new(QuotaSettings::new(
            Limit::UNLIMITED,
            Limit {
                per_second: 1,
                burst: 2,
            },
        ));
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
