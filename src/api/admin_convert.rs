//! KeyAdmin's messages as the control plane's values, and back.

use tonic::Status;

use crate::api::convert::{key_state, timestamp};
use crate::control::{AdminError, KeyView, RetireTarget, TenantId, VersionUsageView};
use crate::keys::KeyHierarchy;
use crate::kms::ProviderKind;
use crate::proto;
use crate::registry::KeyPolicy;

/// The request's tenant id, checked here once for the whole call.
pub(super) fn tenant_id(id: &str) -> Result<TenantId, Status> {
    Ok(admin_tenant(id.to_owned())?)
}

/// [`tenant_id`] of a string the request gives up.
pub(super) fn admin_tenant(id: String) -> Result<TenantId, AdminError> {
    TenantId::parse(id).map_err(|e| AdminError::InvalidArgument(e.to_string()))
}

pub(super) fn access_policy_to_proto(policy: &crate::access::AccessPolicy) -> proto::AccessPolicy {
    proto::AccessPolicy {
        require_reason: policy.require_reason,
        allowed_reasons: policy.allowed.iter().map(|r| r.to_proto()).collect(),
    }
}

pub(super) fn access_policy_from_proto(
    policy: Option<proto::AccessPolicy>,
) -> Result<crate::access::AccessPolicy, AdminError> {
    use crate::access::{AccessPolicy, Reason};
    let policy = policy.unwrap_or_default();
    let allowed = policy
        .allowed_reasons
        .iter()
        .map(|&n| {
            Reason::from_proto(n).ok_or_else(|| {
                AdminError::InvalidArgument(format!(
                    "access_policy.allowed_reasons: {n} is not an AccessReason this server knows"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    AccessPolicy::new(policy.require_reason, allowed)
        .map_err(|why| AdminError::InvalidArgument(format!("access_policy: {why}")))
}

/// A ListKeyAccess request as a registry query (its page token is read by
/// the control plane).
pub(super) fn access_query(
    req: &proto::ListKeyAccessRequest,
) -> Result<crate::registry::access_log::AccessQuery, AdminError> {
    use crate::access::Reason;
    let to_ms = req
        .end_time
        .as_ref()
        .map_or_else(crate::keys::now_ms, crate::api::convert::millis);
    let from_ms = req.start_time.as_ref().map_or(
        to_ms.saturating_sub(24 * 3600 * 1000),
        crate::api::convert::millis,
    );
    let reason = match (Reason::from_proto(req.reason), req.no_reason_only) {
        (None, _) => {
            return Err(AdminError::InvalidArgument(format!(
                "reason {} is not an AccessReason this server knows",
                req.reason
            )));
        }
        (Some(Reason::NoReason), true) => Some(Reason::NoReason),
        (Some(_), true) => {
            return Err(AdminError::InvalidArgument(
                "no_reason_only selects calls without a reason: leave reason unset".into(),
            ));
        }
        (Some(Reason::NoReason), false) => None,
        (Some(reason), false) => Some(reason),
    };
    let filter = |f: &str| (!f.is_empty()).then(|| f.to_owned());
    Ok(crate::registry::access_log::AccessQuery {
        tenant_id: req.tenant_id.clone(),
        from_ms,
        to_ms,
        caller: filter(&req.caller),
        reason: reason.map(|r| r.as_str().to_owned()),
        key_binding: filter(&req.key_binding),
        operation: filter(&req.operation),
        outcome: filter(&req.outcome),
        individual_only: req.individual_only,
        after: None,
        limit: req.page_size,
    })
}

pub(super) fn access_record_to_proto(
    r: &crate::registry::access_log::AccessRecord,
) -> proto::KeyAccessRecord {
    proto::KeyAccessRecord {
        time: Some(timestamp(r.time_ms)),
        individual: r.individual,
        caller: r.caller.clone(),
        reason: r
            .reason
            .parse::<crate::access::Reason>()
            .unwrap_or_default()
            .to_proto(),
        reason_detail: r.reason_detail.clone(),
        key_binding: r.key_binding.clone(),
        key_version: r.key_version.clone(),
        operation: r.operation.clone(),
        outcome: r.outcome.clone(),
        count: r.count,
        request_id: r.request_id.clone(),
        error: r.error.clone(),
    }
}

pub(super) fn policy_to_proto(policy: KeyPolicy) -> proto::KeyPolicy {
    match policy {
        KeyPolicy::Keyring => proto::KeyPolicy::Keyring,
        KeyPolicy::SingleKey => proto::KeyPolicy::SingleKey,
    }
}

pub(super) fn hierarchy_from_proto(value: i32) -> Result<Option<KeyHierarchy>, AdminError> {
    match proto::KeyHierarchy::try_from(value) {
        Ok(proto::KeyHierarchy::TenantKey) => Ok(Some(KeyHierarchy::TenantKey)),
        Ok(proto::KeyHierarchy::Direct) => Ok(Some(KeyHierarchy::Direct)),
        Ok(proto::KeyHierarchy::Unspecified) => Ok(None),
        Err(_) => Err(AdminError::InvalidArgument(format!(
            "key_hierarchy {value} is not KEY_HIERARCHY_TENANT_KEY or KEY_HIERARCHY_DIRECT"
        ))),
    }
}

pub(super) fn policy_from_proto(
    value: i32,
    required: bool,
) -> Result<Option<KeyPolicy>, AdminError> {
    match proto::KeyPolicy::try_from(value) {
        Ok(proto::KeyPolicy::Keyring) => Ok(Some(KeyPolicy::Keyring)),
        Ok(proto::KeyPolicy::SingleKey) => Ok(Some(KeyPolicy::SingleKey)),
        Ok(proto::KeyPolicy::Unspecified) if !required => Ok(None),
        _ => Err(AdminError::InvalidArgument(format!(
            "key_policy {value} is not KEY_POLICY_KEYRING or KEY_POLICY_SINGLE_KEY"
        ))),
    }
}

pub(crate) fn key_to_proto(view: &KeyView) -> proto::KeyBinding {
    let r = &view.record;
    proto::KeyBinding {
        tenant_id: r.tenant_id.clone(),
        name: r.name.clone(),
        description: r.description.clone(),
        provider: proto::Provider::from(r.provider).into(),
        key_reference: r.key_reference.clone(),
        region: r.region.clone(),
        // The identity column: an AWS role, a Vault AppRole's role_id, or
        // an Azure customer tenant; each shown in its own field.
        role_arn: match r.provider {
            ProviderKind::AzureKeyVault => String::new(),
            _ => r.role_arn.clone(),
        },
        azure_tenant_id: match r.provider {
            ProviderKind::AzureKeyVault => r.role_arn.clone(),
            _ => String::new(),
        },
        service_account: r.service_account.clone(),
        state: key_state(r.state).into(),
        state_reason: r.state_reason.clone(),
        primary: r.primary,
        create_time: Some(timestamp(r.created_at_ms)),
        update_time: Some(timestamp(r.updated_at_ms)),
        last_use_time: r.last_used_at_ms.map(timestamp),
        wrap_count: r.wrap_count,
        unwrap_count: r.unwrap_count,
        replica_regions: r.replica_regions.clone(),
        min_decryption_version: view.min_decryption_version,
        versions: view.versions.iter().map(version_to_proto).collect(),
        rotation_due: view.rotation_due(),
        next_rotation_time: view.next_rotation_ms.map(timestamp),
    }
}

pub(super) fn version_to_proto(v: &VersionUsageView) -> proto::KeyVersionUsage {
    proto::KeyVersionUsage {
        version: v.version.clone(),
        wrap_count: v.wraps,
        unwrap_count: v.unwraps,
        last_use_time: v.last_used_ms.map(timestamp),
        tenant_key_versions: v.tenant_key_versions,
        retired: v.retired,
    }
}

pub(super) fn retire_target(
    req: &proto::RetireKeyVersionsRequest,
) -> Result<RetireTarget, AdminError> {
    match proto::RetireTarget::try_from(req.target) {
        Ok(proto::RetireTarget::Key) => {
            crate::control::validate_name(&req.name)?;
            Ok(RetireTarget::Key(req.name.clone()))
        }
        Ok(proto::RetireTarget::TenantKey) => Ok(RetireTarget::TenantKey),
        Ok(proto::RetireTarget::PlatformKeyring) => Ok(RetireTarget::PlatformKeyring),
        _ => Err(AdminError::InvalidArgument(format!(
            "target {} is not RETIRE_TARGET_KEY, RETIRE_TARGET_TENANT_KEY or RETIRE_TARGET_PLATFORM_KEYRING",
            req.target
        ))),
    }
}
