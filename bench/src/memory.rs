//! Resident memory per cached key: a fresh process fills the DEK cache
//! through the real unwrap path (platform keyring, one wrapped key at a time
//! so the wrapped keys themselves are not counted) and reports the growth
//! of its resident set divided by the entries.

use keybroker::broker::Reason;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use keybroker::broker::Broker;
use keybroker::cache::{CacheSettings, DekCache};
use keybroker::context::{Context, TenantId};
use keybroker::keys::{Binding, PLATFORM_BINDING, PlatformOnly};
use keybroker::kms::local::LocalKeyring;
use keybroker::quota::QuotaSettings;
use keybroker::secret::SecretBytes;
use serde_json::json;

/// Bytes currently resident (`/proc/self/statm`).
pub(crate) fn resident_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("bad statm")?
        .parse()?;
    Ok(pages * rustix::param::page_size() as u64)
}

/// Spawns one child per size and reports.
pub(crate) fn run(entries: &[usize], json_out: Option<&Path>) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let mut results = Vec::new();
    for &n in entries {
        let output = std::process::Command::new(&me)
            .args(["memory-child", "--entries", &n.to_string()])
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "memory child failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        println!("{result}");
        results.push(result);
    }
    let report = json!({ "machine": crate::machine_facts(), "results": results });
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// Fills a cache with `entries` keys and prints one JSON object.
pub(crate) fn child(entries: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let keyring = LocalKeyring::from_material("platform", &[SecretBytes::random(32)?])?;
        let binding = Arc::new(Binding::active(
            PLATFORM_BINDING,
            Arc::new(keyring),
            "bench",
        ));
        let cache = DekCache::new(CacheSettings {
            max_entries: entries as u64 + 1000,
            max_bytes: u64::MAX,
            tenant_share: 100,
            ttl: std::time::Duration::from_secs(3600),
            tti: std::time::Duration::from_secs(3600),
        });
        let broker = Broker::new(
            Arc::new(PlatformOnly::new(binding)),
            cache.clone(),
            QuotaSettings::default(),
        );
        let context = Context::new([("table".to_owned(), "orders".to_owned())].into())?;
        let tenant = TenantId::parse("tenant-0001".into())?;
        let fill = async |n: usize| {
            for _ in 0..n {
                let wrapped = broker
                    .generate(&tenant, &context, 32, Reason::NoReason, None)
                    .await?
                    .wrapped_key;
                broker
                    .unwrap(&tenant, &context, &wrapped, Reason::NoReason, None)
                    .await?;
            }
            cache.run_pending_tasks().await;
            Ok::<_, anyhow::Error>(())
        };
        // Warm-up: allocator arenas, moka's internals, the keyring.
        fill(1000).await?;
        let before = resident_bytes()?;
        fill(entries).await?;
        let after = resident_bytes()?;
        let count = cache.entry_count();
        anyhow::ensure!(
            count as usize == entries + 1000,
            "cache holds {count} entries"
        );
        let per_entry = (after.saturating_sub(before)) as f64 / entries as f64;
        println!(
            "{}",
            json!({
                "entries": entries,
                "resident_before_bytes": before,
                "resident_after_bytes": after,
                "bytes_per_entry": per_entry,
                "target_bytes_per_entry": 512,
                "within_target": per_entry <= 512.0,
            })
        );
        Ok(())
    })
}
