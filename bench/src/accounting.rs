//! KMS-call accounting: the data plane with an in-process provider that
//! injects latency and counts calls. Call counts are exact and checked
//! (a wrong count fails the command); wall times are reported, not asserted.

use keybroker::broker::Reason;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keybroker::broker::Broker;
use keybroker::cache::{CacheSettings, DekCache};
use keybroker::context::{Context, TenantId};
use keybroker::keys::{
    Binding, DirectoryError, KeyDirectory, KeyHierarchy, Minted, NewTenantKey, PLATFORM_BINDING,
    PlatformOnly, TenantKeyVersion, TenantKeys, TenantLife,
};
use keybroker::kms::local::LocalKeyring;
use keybroker::kms::{
    Ciphertext, KeyDescription, KeyProvider, ProviderError, ProviderKind, WrapContext,
};
use keybroker::quota::QuotaSettings;
use keybroker::secret::SecretBytes;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub(crate) struct AccountingArgs {
    /// Latency the provider injects into every call.
    #[arg(long, default_value = "20ms", value_parser = crate::parse_duration)]
    latency: Duration,
    /// Cold keys for the K-keys check.
    #[arg(long, default_value_t = 100)]
    keys: usize,
    /// Cache TTL for the TTL-window check.
    #[arg(long, default_value = "300ms", value_parser = crate::parse_duration)]
    ttl: Duration,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// A local keyring behind injected latency, counting decrypts; can be told
/// to fail.
#[derive(Debug)]
struct CountingProvider {
    inner: LocalKeyring,
    latency: Duration,
    decrypts: AtomicU64,
    /// Encrypts (tenant key mints; DEK wraps under `direct`).
    encrypts: AtomicU64,
    failing: AtomicBool,
}

#[async_trait]
impl KeyProvider for CountingProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        self.encrypts.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        self.inner.encrypt(plaintext, wrap).await
    }

    async fn decrypt(
        &self,
        key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError> {
        self.decrypts.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        if self.failing.load(Ordering::SeqCst) {
            return Err(ProviderError::Unavailable("injected failure".into()));
        }
        self.inner.decrypt(key_version, ciphertext, wrap).await
    }

    async fn describe(&self) -> Result<KeyDescription, ProviderError> {
        self.inner.describe().await
    }
}

fn check(name: &str, expected: u64, actual: u64, failures: &mut Vec<String>) -> serde_json::Value {
    if expected != actual {
        failures.push(format!(
            "{name}: expected {expected} provider calls, saw {actual}"
        ));
    }
    json!({ "check": name, "expected_calls": expected, "provider_calls": actual, "ok": expected == actual })
}

pub(crate) fn run(args: AccountingArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: AccountingArgs) -> anyhow::Result<()> {
    let provider = Arc::new(CountingProvider {
        inner: LocalKeyring::from_material("platform", &[SecretBytes::random(32)?])?,
        latency: args.latency,
        decrypts: AtomicU64::new(0),
        encrypts: AtomicU64::new(0),
        failing: AtomicBool::new(false),
    });
    let binding = Arc::new(Binding::active(
        PLATFORM_BINDING,
        Arc::clone(&provider) as Arc<dyn KeyProvider>,
        "bench",
    ));
    let unlimited = QuotaSettings::UNLIMITED;
    let cache = DekCache::new(CacheSettings {
        max_entries: 1_000_000,
        max_bytes: u64::MAX,
        tenant_share: 100,
        ttl: args.ttl,
        tti: args.ttl,
    });
    let broker = Arc::new(Broker::new(
        Arc::new(PlatformOnly::new(binding)),
        cache,
        unlimited,
    ));
    let context = Context::new([("table".to_owned(), "t".to_owned())].into())?;
    let generate = |n: usize| {
        let broker = Arc::clone(&broker);
        let context = context.clone();
        async move {
            let acme = TenantId::parse("acme".into())?;
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                keys.push(
                    broker
                        .generate(&acme, &context, 32, Reason::NoReason, None)
                        .await?
                        .wrapped_key,
                );
            }
            Ok::<_, anyhow::Error>(keys)
        }
    };
    let calls = || provider.decrypts.load(Ordering::SeqCst);
    let tenant = TenantId::parse("acme".into())?;
    let burst = |keys: Vec<Vec<u8>>, per_key: usize| {
        let broker = Arc::clone(&broker);
        let context = context.clone();
        let tenant = tenant.clone();
        async move {
            let started = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for key in keys {
                for _ in 0..per_key {
                    let (broker, context, key, acme) = (
                        Arc::clone(&broker),
                        context.clone(),
                        key.clone(),
                        tenant.clone(),
                    );
                    set.spawn(async move {
                        let ok = broker
                            .unwrap(&acme, &context, &key, Reason::NoReason, None)
                            .await
                            .is_ok();
                        (ok, started.elapsed())
                    });
                }
            }
            let mut ok = 0u64;
            let mut latencies = Vec::new();
            while let Some(r) = set.join_next().await {
                let (succeeded, latency) = r.unwrap_or((false, Duration::ZERO));
                ok += u64::from(succeeded);
                latencies.push(latency);
            }
            latencies.sort();
            (ok, started.elapsed(), latencies)
        }
    };

    let mut failures = Vec::new();
    let mut results = Vec::new();
    for concurrency in [1usize, 64, 1000] {
        let key = generate(1).await?;
        let before = calls();
        let (ok, wall, latencies) = burst(key, concurrency).await;
        let mut r = check(
            &format!("{concurrency} concurrent unwraps of one cold key"),
            1,
            calls() - before,
            &mut failures,
        );
        r["succeeded"] = json!(ok);
        let over = |d: Duration| (d.as_secs_f64() - args.latency.as_secs_f64()) * 1e3;
        // Each request's time from the burst's start, minus the latency.
        r["request_over_latency_ms"] = json!({
            "p50": over(latencies[latencies.len() / 2]),
            "p99": over(latencies[latencies.len() * 99 / 100]),
            "max": over(wall),
        });
        if ok != concurrency as u64 {
            failures.push(format!(
                "{concurrency} concurrent unwraps: only {ok} succeeded"
            ));
        }
        results.push(r);
    }

    let keys = generate(args.keys).await?;
    let before = calls();
    let (ok, wall, _) = burst(keys.clone(), 8).await;
    let mut r = check(
        &format!("{} cold keys, 8 concurrent unwraps each", args.keys),
        args.keys as u64,
        calls() - before,
        &mut failures,
    );
    r["succeeded"] = json!(ok);
    r["wall_ms"] = json!(wall.as_secs_f64() * 1e3);
    results.push(r);

    // Across a run: the same keys again and again; provider calls are the
    // distinct keys per TTL window.
    let windows = 3u32;
    let fresh = generate(10).await?;
    let before = calls();
    let run_started = Instant::now();
    let run_for = args.ttl * windows - args.ttl / 2;
    let mut rounds = 0u64;
    while run_started.elapsed() < run_for {
        burst(fresh.clone(), 1).await;
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Each of the 10 keys is loaded once per TTL window it is used in: the
    // run covers 2.5 windows, so 3 loads each.
    let actual = calls() - before;
    let mut r = check(
        &format!(
            "10 keys unwrapped {rounds} times across {windows} TTL windows of {:?}",
            args.ttl
        ),
        10 * u64::from(windows),
        actual,
        &mut failures,
    );
    r["rounds"] = json!(rounds);
    results.push(r);

    // A failing provider: once per miss burst, and the failure is not cached.
    provider.failing.store(true, Ordering::SeqCst);
    let key = generate(1).await?;
    let before = calls();
    let (ok, _, _) = burst(key.clone(), 100).await;
    let mut r = check(
        "100 concurrent unwraps, failing provider",
        1,
        calls() - before,
        &mut failures,
    );
    r["succeeded"] = json!(ok);
    if ok != 0 {
        failures.push("a failing provider returned keys".into());
    }
    results.push(r);
    provider.failing.store(false, Ordering::SeqCst);
    let before = calls();
    let (ok, _, _) = burst(key, 100).await;
    let mut r = check(
        "100 concurrent unwraps after recovery (failure not cached)",
        1,
        calls() - before,
        &mut failures,
    );
    r["succeeded"] = json!(ok);
    if ok != 100 {
        failures.push(format!("after recovery only {ok} of 100 succeeded"));
    }
    results.push(r);

    // The tenant key hierarchy: every tenant's DEKs under one customer key
    // (a binding named `cmk`). Customer-KMS calls are one mint per tenant,
    // whatever the number of DEKs and cold unwraps (under `direct`: one
    // call per DEK and one per cold unwrap, 2 x tenants x keys).
    let tenants = 100usize;
    let per_tenant = args.keys;
    let directory = Arc::new(HierarchyDirectory::new(Arc::clone(&provider)));
    let hierarchy = Arc::new(Broker::new(
        Arc::clone(&directory) as Arc<dyn KeyDirectory>,
        DekCache::new(CacheSettings {
            max_entries: 1_000_000,
            max_bytes: u64::MAX,
            tenant_share: 100,
            ttl: Duration::from_secs(3600),
            tti: Duration::from_secs(3600),
        }),
        unlimited,
    ));
    let provider_calls =
        || provider.decrypts.load(Ordering::SeqCst) + provider.encrypts.load(Ordering::SeqCst);
    let before = provider_calls();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tenants {
        let (broker, context) = (Arc::clone(&hierarchy), context.clone());
        set.spawn(async move {
            let tenant = TenantId::parse(format!("tenant-{t:03}"))?;
            let mut wrapped = Vec::with_capacity(per_tenant);
            for _ in 0..per_tenant {
                wrapped.push(
                    broker
                        .generate(&tenant, &context, 32, Reason::NoReason, None)
                        .await?
                        .wrapped_key,
                );
            }
            // Cold: no DEK is in the cache (generate does not cache it).
            for w in &wrapped {
                broker
                    .unwrap(&tenant, &context, w, Reason::NoReason, None)
                    .await?;
            }
            Ok::<_, keybroker::broker::BrokerError>(())
        });
    }
    let mut errors = 0;
    while let Some(r) = set.join_next().await {
        errors += usize::from(!matches!(r, Ok(Ok(()))));
    }
    let mut r = check(
        &format!(
            "tenant_key: {tenants} tenants x {per_tenant} GenerateDataKey + {per_tenant} cold UnwrapKey (direct: {} calls)",
            2 * tenants * per_tenant
        ),
        tenants as u64,
        provider_calls() - before,
        &mut failures,
    );
    r["wall_ms"] = json!(started.elapsed().as_secs_f64() * 1e3);
    r["direct_calls"] = json!(2 * tenants * per_tenant);
    if errors > 0 {
        failures.push(format!("tenant_key: {errors} tenants failed"));
    }
    results.push(r);

    let report = json!({
        "machine": crate::machine_facts(),
        "injected_latency_ms": args.latency.as_secs_f64() * 1e3,
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    anyhow::ensure!(failures.is_empty(), "call accounting failed: {failures:?}");
    Ok(())
}

/// Tenants on the `tenant_key` hierarchy under one customer binding, their
/// tenant key versions kept in memory (what the registry keeps).
#[derive(Debug)]
struct HierarchyDirectory {
    cmk: Arc<Binding>,
    platform: Arc<Binding>,
    /// Versions by tenant. std Mutex: map access only, never across await.
    versions: std::sync::Mutex<std::collections::HashMap<String, Vec<Arc<TenantKeyVersion>>>>,
}

impl HierarchyDirectory {
    fn new(provider: Arc<CountingProvider>) -> Self {
        let cmk = Arc::new(Binding::active(
            "cmk",
            provider as Arc<dyn KeyProvider>,
            "bench",
        ));
        let platform = Arc::clone(&cmk);
        Self {
            cmk,
            platform,
            versions: std::sync::Mutex::default(),
        }
    }
}

#[async_trait]
impl KeyDirectory for HierarchyDirectory {
    async fn tenant_keys(&self, tenant_id: &str) -> Result<Arc<TenantKeys>, DirectoryError> {
        let versions = self
            .versions
            .lock()
            .map_err(|_| DirectoryError::Internal("poisoned".into()))?
            .get(tenant_id)
            .cloned()
            .unwrap_or_default();
        Ok(Arc::new(TenantKeys {
            primary: Arc::clone(&self.cmk),
            bindings: vec![Arc::clone(&self.cmk)],
            platform: Arc::clone(&self.platform),
            hierarchy: KeyHierarchy::TenantKey,
            versions,
            reencrypt_to: None,
            reencrypt_from: None,
            min_tenant_key_version: 0,
            tenant_key_usage: Arc::default(),
            life: TenantLife {
                legacy_deks: true,
                ..TenantLife::default()
            },
        }))
    }

    async fn mint_tenant_key(&self, key: &NewTenantKey) -> Result<Minted, DirectoryError> {
        let mut map = self
            .versions
            .lock()
            .map_err(|_| DirectoryError::Internal("poisoned".into()))?;
        let versions = map.entry(key.tenant_id.clone()).or_default();
        if versions.iter().any(|v| v.version == key.version) {
            return Ok(Minted::Stale);
        }
        versions.push(Arc::new(TenantKeyVersion {
            version: key.version,
            binding: Arc::clone(&self.cmk),
            provider_key_version: key.provider_key_version.clone(),
            wrapped: key.wrapped.clone(),
            created_at_ms: keybroker::keys::now_ms(),
            epoch: 0,
        }));
        Ok(Minted::Stored)
    }
}
