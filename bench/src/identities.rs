//! Memory per idle tenant identity, and the bound on how many stay live
//! (issue 21): a fresh process per run makes `count` AWS identities (one
//! customer role session per tenant, each used once for a DescribeKey
//! through moto, so it holds assumed credentials and a KMS client), then
//! reports the growth of its resident set per identity and how many
//! sessions the bounded cache kept. With `--capacity` below `--count`, the
//! cache holds `capacity` sessions and memory stops growing with tenants.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use keybroker::kms::KeyProvider;
use keybroker::kms::aws::{AwsKeyTarget, AwsKms, AwsSettings, KeyArn, RoleArn};
use serde_json::json;

use crate::cold_start::{ROLE_ARN_PREFIX, sdk_config, start_moto};

#[derive(Debug, clap::Args)]
pub(crate) struct IdentitiesArgs {
    /// Tenants (identities) to make.
    #[arg(long, default_value = "2000")]
    count: usize,
    /// Session cache capacities to measure, one fresh process each.
    #[arg(long, value_delimiter = ',', default_value = "10000,500")]
    capacity: Vec<u64>,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// One child process per capacity.
pub(crate) fn run(args: IdentitiesArgs) -> anyhow::Result<()> {
    let moto = start_moto()?;
    let me = std::env::current_exe()?;
    let mut results = Vec::new();
    for capacity in &args.capacity {
        let output = std::process::Command::new(&me)
            .args([
                "identities-child",
                "--count",
                &args.count.to_string(),
                "--capacity",
                &capacity.to_string(),
                "--moto-url",
                &moto.url,
            ])
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "identities child failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        println!("{result}");
        results.push(result);
    }
    write_report(args.json.as_deref(), results)
}

fn write_report(path: Option<&Path>, results: Vec<serde_json::Value>) -> anyhow::Result<()> {
    let report = json!({ "machine": crate::machine_facts(), "results": results });
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// Makes `count` identities with a session cache of `capacity`; prints one
/// JSON object.
pub(crate) fn child(count: usize, capacity: u64, moto_url: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let settings = AwsSettings {
            kms_endpoint: Some(moto_url.to_owned()),
            sts_endpoint: Some(moto_url.to_owned()),
            identity: keybroker::kms::aws::AwsIdentityCache {
                capacity,
                ..AwsSettings::default().identity
            },
            max_attempts: 1,
            ..AwsSettings::default()
        };
        let kms = Arc::new(AwsKms::new(sdk_config(), settings));
        let key_arn = aws_sdk_kms::Client::from_conf(
            aws_sdk_kms::config::Builder::from(&sdk_config())
                .endpoint_url(moto_url)
                .build(),
        )
        .create_key()
        .send()
        .await?
        .key_metadata
        .and_then(|m| m.arn)
        .context("moto created no key")?;
        let key_arn = KeyArn::parse(&key_arn)?;
        let describe = async |i: usize| -> anyhow::Result<()> {
            let provider = kms.key(AwsKeyTarget {
                tenant_id: format!("tenant-{i:06}"),
                key_arn: key_arn.clone(),
                role_arn: RoleArn::parse(&format!("{ROLE_ARN_PREFIX}{i}"))?,
                external_id: format!("kb-ext-{i:06}"),
                replica_regions: Vec::new(),
            });
            provider.describe().await?;
            Ok(())
        };
        // Warm-up: allocator arenas, the SDK's shared runtime pieces.
        for i in 0..100 {
            describe(1_000_000 + i).await?;
        }
        let before = crate::memory::resident_bytes()?;
        for i in 0..count {
            describe(i).await?;
        }
        let live = kms.live_sessions();
        let after = crate::memory::resident_bytes()?;
        let grown = after.saturating_sub(before);
        println!(
            "{}",
            json!({
                "identities": count,
                "capacity": capacity,
                "live_sessions": live,
                "assume_role_calls": kms.assume_role_calls.load(std::sync::atomic::Ordering::Relaxed),
                "resident_growth_bytes": grown,
                "bytes_per_identity_made": grown as f64 / count as f64,
            })
        );
        Ok(())
    })
}
