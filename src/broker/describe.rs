//! DescribeKey: a tenant's keys, their states and its key change.

use std::sync::Arc;

use super::*;

#[derive(Debug)]
pub struct BindingStatus {
    pub name: Arc<str>,
    pub provider: ProviderKind,
    pub key_reference: String,
    pub state: BindingState,
    pub state_reason: String,
    pub primary: bool,
    pub current_key_version: String,
    /// Last key-state check by the watcher; `None` if never checked.
    pub last_checked_ms: Option<i64>,
}

#[derive(Debug)]
pub struct Description {
    pub tenant_id: String,
    pub uses_platform_key: bool,
    pub primary: KeyInfo,
    pub bindings: Vec<BindingStatus>,
    pub hierarchy: KeyHierarchy,
    /// The newest tenant key version (0: none yet).
    pub tenant_key_version: u32,
    /// A key change moving every version to this binding is under way.
    pub reencrypt_to: Option<String>,
    /// Versions under the key change's target (or all when none runs).
    pub versions_done: u32,
    pub versions_total: u32,
}

impl Broker {
    pub async fn describe(&self, tenant_id: &TenantId) -> Result<Description, BrokerError> {
        let keys = self.directory.tenant_keys(tenant_id).await?;
        ensure_live(&keys, tenant_id)?;
        let status = |b: &Arc<Binding>| BindingStatus {
            name: Arc::clone(&b.name),
            provider: b.provider.kind(),
            key_reference: b.key_reference.clone(),
            state: b.state,
            state_reason: b.state_reason.clone(),
            primary: Arc::ptr_eq(b, &keys.primary),
            current_key_version: current_version(b),
            last_checked_ms: Some(b.usage.last_checked_ms.load(Ordering::Relaxed))
                .filter(|ms| *ms > 0),
        };
        let mut bindings: Vec<BindingStatus> = keys.bindings.iter().map(status).collect();
        if keys.uses_platform_key() {
            bindings.insert(0, status(&keys.platform));
        }
        let total = u32::try_from(keys.versions.len()).unwrap_or(u32::MAX);
        let done = match &keys.reencrypt_to {
            Some(target) => keys
                .versions
                .iter()
                .filter(|v| *v.binding.name == **target)
                .count(),
            None => keys.versions.len(),
        };
        Ok(Description {
            tenant_id: tenant_id.to_string(),
            uses_platform_key: keys.uses_platform_key(),
            primary: keys.primary.info(current_version(&keys.primary)),
            bindings,
            hierarchy: keys.hierarchy,
            tenant_key_version: keys.versions.last().map_or(0, |v| v.version),
            reencrypt_to: keys.reencrypt_to.clone(),
            versions_done: u32::try_from(done).unwrap_or(u32::MAX),
            versions_total: total,
        })
    }
}
