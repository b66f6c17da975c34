//! `kb admin access-log`: a tenant's key access log as JSON Lines, for a
//! SIEM (one record per line, oldest first, every page).

use std::io::Write as _;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::connection::TenantChannel;
use super::output::Answer;
use crate::proto::{self, key_admin_client::KeyAdminClient};

#[derive(Debug, clap::Args)]
pub(super) struct AccessLogArgs {
    #[arg(long)]
    pub(super) tenant: String,
    /// From this long ago (e.g. 24h, 30days).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    since: std::time::Duration,
    /// Only this caller identity.
    #[arg(long)]
    caller: Option<String>,
    /// Only this reason (customer_support, ...; `none` for calls without).
    #[arg(long, value_parser = crate::access::Reason::parse)]
    reason: Option<crate::access::Reason>,
    /// Only this key binding.
    #[arg(long)]
    key: Option<String>,
    /// Only this operation (GenerateDataKey, WrapKey, UnwrapKey, RewrapKey).
    #[arg(long)]
    operation: Option<String>,
    /// Only this outcome (a gRPC code name: OK, PERMISSION_DENIED, ...).
    #[arg(long)]
    outcome: Option<String>,
    /// Individual records only (refusals, uses with a detail).
    #[arg(long)]
    individual: bool,
    /// Where the JSON Lines go (appended).
    #[arg(long)]
    out: PathBuf,
}

fn record_json(r: &proto::KeyAccessRecord) -> Value {
    let ms = r.time.as_ref().map_or(0, crate::api::convert::millis);
    json!({
        "time": crate::text::rfc3339(ms),
        "individual": r.individual,
        "caller": r.caller,
        "reason": crate::access::Reason::from_proto(r.reason).map_or("unknown", |x| x.as_str()),
        "reason_detail": r.reason_detail,
        "key_binding": r.key_binding,
        "key_version": r.key_version,
        "operation": r.operation,
        "outcome": r.outcome,
        "count": r.count,
        "request_id": r.request_id,
        "error": r.error,
    })
}

/// Pages through the log and appends every record to `--out`; a summary.
pub(super) async fn export(
    mut client: KeyAdminClient<TenantChannel>,
    args: AccessLogArgs,
) -> anyhow::Result<Value> {
    let now = crate::keys::now_ms();
    let since = i64::try_from(args.since.as_millis()).unwrap_or(i64::MAX);
    let stamp = crate::api::convert::timestamp;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.out.display()))?;
    let (mut records, mut uses, mut pages) = (0u64, 0u64, 0u64);
    let mut token = String::new();
    loop {
        let page = client
            .list_key_access(proto::ListKeyAccessRequest {
                tenant_id: args.tenant.clone(),
                start_time: Some(stamp(now.saturating_sub(since))),
                end_time: Some(stamp(now)),
                caller: args.caller.clone().unwrap_or_default(),
                reason: args.reason.map_or(0, |r| r.to_proto()),
                no_reason_only: args.reason == Some(crate::access::Reason::NoReason),
                key_binding: args.key.clone().unwrap_or_default(),
                operation: args.operation.clone().unwrap_or_default(),
                outcome: args.outcome.clone().unwrap_or_default(),
                individual_only: args.individual,
                page_size: 0,
                page_token: token,
            })
            .await
            .answer()?;
        pages += 1;
        let mut text = String::new();
        for r in &page.records {
            text.push_str(&record_json(r).to_string());
            text.push('\n');
            records += 1;
            uses += r.count;
        }
        file.write_all(text.as_bytes())?;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    file.sync_all()?;
    Ok(json!({
        "tenant_id": args.tenant,
        "out": args.out.display().to_string(),
        "records": records,
        "uses": uses,
        "pages": pages,
    }))
}
