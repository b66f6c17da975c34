//! What client commands print: one JSON object per command, bytes as
//! standard base64, times as milliseconds; and the one place a refused call
//! becomes an error message.

use serde_json::{Value, json};

use crate::proto;

/// A gRPC answer as the command's result: the message, or the status code
/// and message as the error (printed on stderr, exit code 1).
pub(super) trait Answer<T> {
    fn answer(self) -> anyhow::Result<T>;
}

impl<T> Answer<T> for Result<tonic::Response<T>, tonic::Status> {
    fn answer(self) -> anyhow::Result<T> {
        self.map(tonic::Response::into_inner)
            .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))
    }
}

pub(super) fn key_json(key: Option<&proto::KeyInfo>) -> Value {
    key.map_or(Value::Null, |k| {
        json!({
            "key_binding": k.key_binding,
            "provider": k.provider().as_str_name(),
            "provider_key_version": k.provider_key_version,
        })
    })
}

pub(super) fn timestamp_json(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.map_or(Value::Null, |t| {
        json!(t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
    })
}

pub(super) fn tenant_json(tenant: Option<&proto::Tenant>) -> Value {
    tenant.map_or(Value::Null, |t| {
        let o = t.onboarding.clone().unwrap_or_default();
        let r = t.reencryption.clone().unwrap_or_default();
        json!({
            "tenant_id": t.tenant_id,
            "key_policy": t.key_policy().as_str_name(),
            "key_hierarchy": t.key_hierarchy().as_str_name(),
            "tenant_key_versions": t.tenant_key_versions,
            "newest_import_primary": t.newest_import_primary,
            "min_tenant_key_version": t.min_tenant_key_version,
            "tenant_key_usage": t.tenant_key_usage.iter().map(version_json).collect::<Vec<_>>(),
            "reencryption": {
                "in_progress": r.in_progress,
                "target": r.target,
                "versions_done": r.versions_done,
                "versions_total": r.versions_total,
            },
            "create_time_ms": timestamp_json(t.create_time.as_ref()),
            "access_policy": access_policy_json(t.access_policy.as_ref()),
            "onboarding": {
                "aws_external_id": o.aws_external_id,
                "aws_trust_policy_json": o.aws_trust_policy_json,
                "aws_key_policy_statement_json": o.aws_key_policy_statement_json,
                "gcp_service_account": o.gcp_service_account,
                "gcp_role": o.gcp_role,
                "vault_policy_hcl": o.vault_policy_hcl,
                "vault_jwt_setup": o.vault_jwt_setup,
                "azure_application_id": o.azure_application_id,
                "azure_consent_url": o.azure_consent_url,
                "azure_role": o.azure_role,
                "key_owner_tag": o.key_owner_tag,
            },
        })
    })
}

/// The tenant's access policy, reasons by name (`customer_support`).
fn access_policy_json(policy: Option<&proto::AccessPolicy>) -> Value {
    let policy = policy.cloned().unwrap_or_default();
    let names: Vec<&str> = policy
        .allowed_reasons
        .iter()
        .map(|&n| crate::access::Reason::from_proto(n).map_or("unknown", |r| r.as_str()))
        .collect();
    json!({
        "require_reason": policy.require_reason,
        "allowed_reasons": if names.is_empty() { json!("all") } else { json!(names) },
    })
}

pub(super) fn binding_json(key: &proto::KeyBinding) -> Value {
    json!({
        "tenant_id": key.tenant_id,
        "name": key.name,
        "description": key.description,
        "provider": key.provider().as_str_name(),
        "key_reference": key.key_reference,
        "region": key.region,
        "role_arn": key.role_arn,
        "service_account": key.service_account,
        "state": key.state().as_str_name(),
        "state_reason": key.state_reason,
        "primary": key.primary,
        "create_time_ms": timestamp_json(key.create_time.as_ref()),
        "last_use_time_ms": timestamp_json(key.last_use_time.as_ref()),
        "wrap_count": key.wrap_count,
        "unwrap_count": key.unwrap_count,
        "replica_regions": key.replica_regions,
        "min_decryption_version": key.min_decryption_version,
        "rotation_due": key.rotation_due,
        "next_rotation_time_ms": timestamp_json(key.next_rotation_time.as_ref()),
        "versions": key.versions.iter().map(version_json).collect::<Vec<_>>(),
    })
}

pub(super) fn version_json(v: &proto::KeyVersionUsage) -> Value {
    json!({
        "version": v.version,
        "wrap_count": v.wrap_count,
        "unwrap_count": v.unwrap_count,
        "last_use_time_ms": timestamp_json(v.last_use_time.as_ref()),
        "tenant_key_versions": v.tenant_key_versions,
        "retired": v.retired,
    })
}

pub(super) fn one_key(key: Option<&proto::KeyBinding>) -> Value {
    key.map_or(Value::Null, binding_json)
}
