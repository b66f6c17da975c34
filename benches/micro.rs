//! Micro-benchmarks of the hot pieces: envelope encode/parse, AAD encoding,
//! local wrap/unwrap, and the cache-hit path (cache alone and the whole
//! data plane). `cargo bench --bench micro`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keybroker::broker::{Broker, Reason};
use keybroker::cache::{CacheKey, CacheSettings, CachedKey, DekCache, Freshness};
use keybroker::context::{self, Context, TenantId};
use keybroker::envelope::Envelope;
use keybroker::keys::{Binding, PLATFORM_BINDING, PlatformOnly};
use keybroker::kms::local::LocalKeyring;
use keybroker::kms::{KeyProvider, ProviderKind, WrapContext};
use keybroker::quota::QuotaSettings;
use keybroker::secret::SecretBytes;

fn context() -> Context {
    Context::new(
        [
            ("table".to_owned(), "orders".to_owned()),
            ("region".to_owned(), "eu-west-1".to_owned()),
        ]
        .into(),
    )
    .unwrap()
}

fn envelope_benches(c: &mut Criterion) {
    let envelope = Envelope {
        tenant_id: "tenant-0001".into(),
        key_binding: "platform".into(),
        provider: ProviderKind::Local,
        provider_key_version: "3".into(),
        ciphertext: vec![7; 60],
        tenant_key_version: 0,
        incarnation: 1,
    };
    let bytes = envelope.encode();
    c.bench_function("envelope_encode", |b| {
        b.iter(|| black_box(&envelope).encode())
    });
    c.bench_function("envelope_parse", |b| {
        b.iter(|| Envelope::parse(black_box(&bytes)).unwrap())
    });
    let ctx = context();
    c.bench_function("aad_encode", |b| {
        b.iter(|| context::aad(black_box("tenant-0001"), black_box(&ctx)))
    });
}

fn keyring_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let keyring =
        LocalKeyring::from_material("platform", &[SecretBytes::random(32).unwrap()]).unwrap();
    let ctx = context();
    let wrap = WrapContext {
        tenant_id: "tenant-0001",
        context: &ctx,
    };
    let dek = SecretBytes::random(32).unwrap();
    let sealed = runtime.block_on(keyring.encrypt(&dek, wrap)).unwrap();
    c.bench_function("local_wrap", |b| {
        b.iter(|| {
            runtime
                .block_on(keyring.encrypt(black_box(&dek), wrap))
                .unwrap()
        })
    });
    c.bench_function("local_unwrap", |b| {
        b.iter(|| {
            runtime
                .block_on(keyring.decrypt(&sealed.key_version, black_box(&sealed.bytes), wrap))
                .unwrap()
        })
    });
}

fn cache_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings = CacheSettings {
        ttl: Duration::from_secs(3600),
        tti: Duration::from_secs(3600),
        ..CacheSettings::default()
    };
    let cache = DekCache::new(settings);
    let key = CacheKey::new("tenant-0001", &[1; 32], &context());
    runtime
        .block_on(cache.get_or_load(key.clone(), Freshness::default(), async {
            let origin = cache.origin(&PLATFORM_BINDING.into(), ProviderKind::Local, "1", 0);
            Ok::<_, ()>(CachedKey::new(
                &SecretBytes::random(32).unwrap(),
                origin,
                Freshness::default(),
            ))
        }))
        .unwrap();
    c.bench_function("cache_hit", |b| {
        b.iter(|| {
            cache
                .get(black_box(&key).clone(), Freshness::default())
                .unwrap()
        })
    });

    // The whole data-plane hit: validation, digests, directory, cache, state.
    let keyring =
        LocalKeyring::from_material("platform", &[SecretBytes::random(32).unwrap()]).unwrap();
    let binding = Arc::new(Binding::active(
        PLATFORM_BINDING,
        Arc::new(keyring),
        "bench",
    ));
    let broker = Broker::new(
        Arc::new(PlatformOnly::new(binding)),
        DekCache::new(settings),
        QuotaSettings::default(),
    );
    let ctx = context();
    let tenant = TenantId::parse("tenant-0001".into()).unwrap();
    let wrapped = runtime
        .block_on(broker.generate(&tenant, &ctx, 32, Reason::NoReason, None))
        .unwrap()
        .wrapped_key;
    runtime
        .block_on(broker.unwrap(&tenant, &ctx, &wrapped, Reason::NoReason, None))
        .unwrap();
    c.bench_function("broker_unwrap_hit", |b| {
        b.iter(|| {
            runtime
                .block_on(broker.unwrap(
                    &tenant,
                    black_box(&ctx),
                    black_box(&wrapped),
                    Reason::NoReason,
                    None,
                ))
                .unwrap()
        })
    });
}

criterion_group!(benches, envelope_benches, keyring_benches, cache_benches);
criterion_main!(benches);
