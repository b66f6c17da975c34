//! The control plane, independent of gRPC: tenants, linking and importing
//! customer keys, primary selection, disable/enable, unlink. Validates input,
//! applies it to the registry, and keeps the data plane's view current
//! (through `RegistryDirectory::changed`: view invalidation, DEK purges).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;

use crate::broker::{BindingState, PLATFORM_BINDING, UsageCounts};
use crate::envelope;
use crate::kms::ProviderKind;
use crate::registry::directory::{RegistryDirectory, seal_material};
use crate::registry::{
    BindingRecord, KeyPolicy, NewBinding, RegistryError, Tenant, UnlinkGuard, now_ms,
};
use crate::secret::SecretBytes;

pub const GCP_ROLE: &str = "roles/cloudkms.cryptoKeyEncrypterDecrypter";
const MAX_NAME_LEN: usize = 64;
const MAX_DESCRIPTION_LEN: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The provider could not verify the key: what the customer must fix.
    #[error("key verification failed: {0}")]
    Verification(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::broker::BrokerError> for AdminError {
    fn from(err: crate::broker::BrokerError) -> Self {
        match err {
            crate::broker::BrokerError::Registry(e) => Self::Registry(e),
            crate::broker::BrokerError::Envelope(e) => Self::InvalidArgument(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// Settings the control plane needs from the config.
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// ARN of the platform's own AWS identity, the principal customers trust.
    pub aws_platform_principal: Option<String>,
    /// The platform's GCP service account customers grant on their keys.
    pub gcp_service_account: Option<String>,
    /// Unlink is refused for a key used within this window (unless forced).
    pub unlink_guard_window: Duration,
}

/// What the customer must configure, derived from the tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Onboarding {
    pub aws_external_id: String,
    pub aws_trust_policy_json: String,
    pub aws_key_policy_statement_json: String,
    pub gcp_service_account: String,
    pub gcp_role: String,
}

/// A binding with its live usage (stored counts plus unflushed ones).
#[derive(Debug, Clone)]
pub struct KeyView {
    pub record: BindingRecord,
}

/// Fields of a key to link or import, as given by the caller.
#[derive(Debug, Clone, Default)]
pub struct LinkRequest {
    pub tenant_id: String,
    pub name: String,
    pub description: String,
    pub provider: Option<ProviderKind>,
    pub key_reference: String,
    pub region: String,
    pub role_arn: String,
    pub service_account: String,
    pub replica_regions: Vec<String>,
    pub make_primary: bool,
}

#[derive(Debug)]
pub struct Admin {
    directory: Arc<RegistryDirectory>,
    settings: AdminSettings,
}

impl Admin {
    pub fn new(directory: Arc<RegistryDirectory>, settings: AdminSettings) -> Self {
        Self {
            directory,
            settings,
        }
    }

    fn registry(&self) -> &Arc<dyn crate::registry::Registry> {
        self.directory.registry()
    }

    /// The data plane's view of the registry (tests count its rechecks).
    pub fn directory(&self) -> &Arc<RegistryDirectory> {
        &self.directory
    }

    pub async fn create_tenant(
        &self,
        tenant_id: &str,
        policy: Option<KeyPolicy>,
    ) -> Result<Tenant, AdminError> {
        validate_tenant(tenant_id)?;
        let now = now_ms();
        let tenant = Tenant {
            id: tenant_id.to_owned(),
            key_policy: policy.unwrap_or(KeyPolicy::Keyring),
            external_id: new_external_id()?,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.registry().create_tenant(&tenant).await?;
        self.directory.changed(tenant_id, None).await;
        Ok(tenant)
    }

    pub async fn tenant(&self, tenant_id: &str) -> Result<Tenant, AdminError> {
        validate_tenant(tenant_id)?;
        self.registry()
            .tenant(tenant_id)
            .await?
            .ok_or_else(|| RegistryError::TenantNotFound(tenant_id.to_owned()).into())
    }

    pub async fn set_policy(
        &self,
        tenant_id: &str,
        policy: KeyPolicy,
    ) -> Result<Tenant, AdminError> {
        validate_tenant(tenant_id)?;
        // Usage decides whether single_key → keyring is allowed.
        self.flush_usage().await?;
        let tenant = self
            .registry()
            .set_key_policy(tenant_id, policy, now_ms())
            .await?;
        self.directory.changed(tenant_id, None).await;
        Ok(tenant)
    }

    pub fn onboarding(&self, tenant: &Tenant) -> Onboarding {
        let trust_policy = self
            .settings
            .aws_platform_principal
            .as_ref()
            .map(|principal| {
                json!({
                    "Version": "2012-10-17",
                    "Statement": [{
                        "Sid": "AllowKeybrokerAssumeRole",
                        "Effect": "Allow",
                        "Principal": { "AWS": principal },
                        "Action": "sts:AssumeRole",
                        "Condition": { "StringEquals": { "sts:ExternalId": tenant.external_id } }
                    }]
                })
            });
        let key_statement = json!({
            "Sid": "AllowKeybrokerUseOfTheKey",
            "Effect": "Allow",
            "Principal": { "AWS": "arn:aws:iam::<YOUR_ACCOUNT_ID>:role/<ROLE_TRUSTING_KEYBROKER>" },
            "Action": [
                "kms:Encrypt",
                "kms:Decrypt",
                "kms:ReEncrypt*",
                "kms:GenerateDataKey*",
                "kms:DescribeKey"
            ],
            "Resource": "*"
        });
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
        Onboarding {
            aws_external_id: tenant.external_id.clone(),
            aws_trust_policy_json: trust_policy.as_ref().map(pretty).unwrap_or_default(),
            aws_key_policy_statement_json: pretty(&key_statement),
            gcp_service_account: self
                .settings
                .gcp_service_account
                .clone()
                .unwrap_or_default(),
            gcp_role: GCP_ROLE.to_owned(),
        }
    }

    /// Links a cloud KMS key. Input is validated fully; the cloud providers
    /// themselves arrive with their own issues.
    pub async fn link_key(&self, req: LinkRequest) -> Result<KeyView, AdminError> {
        validate_tenant(&req.tenant_id)?;
        validate_name(&req.name)?;
        validate_description(&req.description)?;
        match req.provider {
            Some(ProviderKind::AwsKms) => {
                validate_aws_key_arn(&req.key_reference, &req.region)?;
                validate_role_arn(&req.role_arn)?;
                validate_replica_regions(&req.key_reference, &req.region, &req.replica_regions)?;
            }
            Some(ProviderKind::GcpKms) => {
                validate_gcp_key_name(&req.key_reference)?;
                if !req.service_account.is_empty() {
                    validate_service_account(&req.service_account)?;
                }
            }
            Some(ProviderKind::Local) => {
                return Err(AdminError::InvalidArgument(
                    "local keys are linked with ImportKeyMaterial".into(),
                ));
            }
            None => {
                return Err(AdminError::InvalidArgument(
                    "provider is required: PROVIDER_AWS_KMS or PROVIDER_GCP_KMS".into(),
                ));
            }
        }
        // The tenant must exist before anything is verified.
        let tenant = self.tenant(&req.tenant_id).await?;
        let provider = req.provider.unwrap_or(ProviderKind::AwsKms);
        let record = NewBinding {
            tenant_id: req.tenant_id.clone(),
            name: req.name.clone(),
            description: req.description,
            provider,
            key_reference: req.key_reference,
            region: req.region,
            role_arn: req.role_arn,
            service_account: req.service_account,
            replica_regions: req.replica_regions,
            key_material: None,
            make_primary: req.make_primary,
        };
        match provider {
            ProviderKind::AwsKms => {
                let target = crate::registry::directory::aws_target(
                    &BindingRecord::from_new(&record),
                    &tenant.external_id,
                );
                let key = self.directory.aws().key(target);
                let probe = verify_provider(&key, &req.tenant_id).await?;
                key.check_replicas(
                    &probe.bytes,
                    probe_wrap(&req.tenant_id, &envelope::Context::default()),
                )
                .await
                .map_err(|e| AdminError::Verification(e.to_string()))?;
            }
            ProviderKind::GcpKms => {
                let target =
                    crate::registry::directory::gcp_target(&BindingRecord::from_new(&record));
                let key = self.directory.gcp().key(target);
                verify_provider(&key, &req.tenant_id).await?;
            }
            ProviderKind::Local => {
                return Err(AdminError::Internal(
                    "local keys are linked with ImportKeyMaterial".into(),
                ));
            }
        }
        let stored = self.registry().insert_binding(&record, now_ms()).await?;
        self.directory.changed(&req.tenant_id, None).await;
        Ok(self.view(stored))
    }

    /// Imports raw AES-256 key material as a `local` key (Cube's flow), after
    /// a wrap/unwrap round trip with it.
    pub async fn import_key_material(
        &self,
        req: LinkRequest,
        material_base64: &str,
    ) -> Result<KeyView, AdminError> {
        validate_tenant(&req.tenant_id)?;
        validate_name(&req.name)?;
        validate_description(&req.description)?;
        let material = decode_key_material(material_base64)?;
        let keyring = crate::kms::local::LocalKeyring::from_material(
            "verification",
            std::slice::from_ref(&material),
        )
        .map_err(|e| AdminError::Verification(e.to_string()))?;
        verify_provider(&keyring, &req.tenant_id).await?;
        let sealed = seal_material(
            self.directory.platform_keyring(),
            &req.tenant_id,
            &req.name,
            &material,
        )
        .await?;
        let record = self
            .registry()
            .insert_binding(
                &NewBinding {
                    tenant_id: req.tenant_id.clone(),
                    name: req.name.clone(),
                    description: req.description,
                    provider: ProviderKind::Local,
                    key_reference: format!("local:{}/{}", req.tenant_id, req.name),
                    region: String::new(),
                    role_arn: String::new(),
                    service_account: String::new(),
                    replica_regions: Vec::new(),
                    key_material: Some(sealed),
                    make_primary: req.make_primary,
                },
                now_ms(),
            )
            .await?;
        self.directory.changed(&req.tenant_id, None).await;
        Ok(self.view(record))
    }

    pub async fn list_keys(&self, tenant_id: &str) -> Result<Vec<KeyView>, AdminError> {
        self.tenant(tenant_id).await?;
        // Counts read after a flush are exact; later uses are added by `view`.
        self.flush_usage().await?;
        Ok(self
            .registry()
            .bindings(tenant_id)
            .await?
            .into_iter()
            .map(|r| self.view(r))
            .collect())
    }

    pub async fn get_key(&self, tenant_id: &str, name: &str) -> Result<KeyView, AdminError> {
        validate_tenant(tenant_id)?;
        self.flush_usage().await?;
        let record = self
            .registry()
            .binding(tenant_id, name)
            .await?
            .ok_or_else(|| not_found(tenant_id, name))?;
        Ok(self.view(record))
    }

    pub async fn set_primary(&self, tenant_id: &str, name: &str) -> Result<KeyView, AdminError> {
        validate_tenant(tenant_id)?;
        let record = self
            .registry()
            .set_primary(tenant_id, name, now_ms())
            .await?;
        self.directory.changed(tenant_id, None).await;
        Ok(self.view(record))
    }

    pub async fn disable_key(
        &self,
        tenant_id: &str,
        name: &str,
        reason: &str,
    ) -> Result<KeyView, AdminError> {
        validate_tenant(tenant_id)?;
        validate_description(reason)?;
        let reason = if reason.is_empty() {
            "disabled by an operator"
        } else {
            reason
        };
        let record = self
            .registry()
            .set_state(tenant_id, name, BindingState::Disabled, reason, now_ms())
            .await?;
        self.directory.changed(tenant_id, Some(name)).await;
        Ok(self.view(record))
    }

    pub async fn enable_key(&self, tenant_id: &str, name: &str) -> Result<KeyView, AdminError> {
        validate_tenant(tenant_id)?;
        let record = self
            .registry()
            .set_state(tenant_id, name, BindingState::Active, "", now_ms())
            .await?;
        self.directory.changed(tenant_id, None).await;
        Ok(self.view(record))
    }

    pub async fn unlink_key(
        &self,
        tenant_id: &str,
        name: &str,
        force: bool,
    ) -> Result<(), AdminError> {
        validate_tenant(tenant_id)?;
        // The guard must see every use, including those not flushed yet.
        self.flush_usage().await?;
        let window =
            i64::try_from(self.settings.unlink_guard_window.as_millis()).unwrap_or(i64::MAX);
        self.registry()
            .delete_binding(
                tenant_id,
                name,
                UnlinkGuard {
                    not_used_since_ms: now_ms().saturating_sub(window),
                    force,
                },
            )
            .await?;
        self.directory.changed(tenant_id, Some(name)).await;
        self.directory.forget_usage(tenant_id, name);
        Ok(())
    }

    pub async fn flush_usage(&self) -> Result<(), AdminError> {
        Ok(self.directory.flush_usage().await?)
    }

    /// Adds unflushed usage to the stored counts.
    fn view(&self, mut record: BindingRecord) -> KeyView {
        let pending: UsageCounts = self
            .directory
            .pending_usage(&record.tenant_id, &record.name);
        record.wrap_count += pending.wraps;
        record.unwrap_count += pending.unwraps;
        if pending.last_used_ms > 0 {
            record.last_used_at_ms = Some(
                record
                    .last_used_at_ms
                    .map_or(pending.last_used_ms, |l| l.max(pending.last_used_ms)),
            );
        }
        KeyView { record }
    }
}

fn not_found(tenant_id: &str, name: &str) -> AdminError {
    RegistryError::BindingNotFound {
        tenant_id: tenant_id.to_owned(),
        name: name.to_owned(),
    }
    .into()
}

fn new_external_id() -> Result<String, AdminError> {
    let bytes = SecretBytes::random(16)
        .map_err(|_| AdminError::Internal("system random generator failed".into()))?;
    Ok(format!("kb-{}", hex::encode(bytes.expose())))
}

fn validate_tenant(tenant_id: &str) -> Result<(), AdminError> {
    envelope::validate_tenant_id(tenant_id).map_err(|e| AdminError::InvalidArgument(e.to_string()))
}

pub fn validate_name(name: &str) -> Result<(), AdminError> {
    let bad = |why: &str| {
        Err(AdminError::InvalidArgument(format!(
            "invalid key name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return bad("a name is required");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("at most 64 characters");
    }
    if name == PLATFORM_BINDING {
        return bad("`platform` is reserved for the platform key");
    }
    let mut chars = name.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        || !chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return bad("use ASCII letters, digits and ._- , starting with a letter or digit");
    }
    Ok(())
}

fn validate_description(text: &str) -> Result<(), AdminError> {
    if text.len() > MAX_DESCRIPTION_LEN || text.chars().any(char::is_control) {
        return Err(AdminError::InvalidArgument(format!(
            "descriptions and reasons are at most {MAX_DESCRIPTION_LEN} bytes without control characters"
        )));
    }
    Ok(())
}

fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_aws_partition(s: &str) -> bool {
    matches!(s, "aws" | "aws-cn" | "aws-us-gov" | "aws-iso" | "aws-iso-b")
}

fn is_region(s: &str) -> bool {
    // e.g. us-east-1, eu-central-2, us-gov-west-1
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
        && parts
            .last()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// `arn:aws:kms:REGION:ACCOUNT:key/ID` or `...:alias/NAME`, in `region`.
pub fn validate_aws_key_arn(arn: &str, region: &str) -> Result<(), AdminError> {
    let bad = |why: &str| {
        Err(AdminError::InvalidArgument(format!(
            "invalid AWS KMS key ARN {arn:?}: {why} (expected arn:aws:kms:REGION:ACCOUNT_ID:key/KEY_ID or ...:alias/NAME)"
        )))
    };
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    if parts.len() != 6 || parts[0] != "arn" || !is_aws_partition(parts[1]) || parts[2] != "kms" {
        return bad("not a KMS ARN");
    }
    if !is_region(parts[3]) {
        return bad("bad region");
    }
    if !is_account_id(parts[4]) {
        return bad("the account id must be 12 digits");
    }
    let resource_ok = match parts[5].split_once('/') {
        Some(("key", id)) => {
            !id.is_empty()
                && id.len() <= 128
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        }
        Some(("alias", name)) => {
            !name.is_empty()
                && name.len() <= 250
                && !name.starts_with("aws/")
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
        }
        _ => false,
    };
    if !resource_ok {
        return bad("the resource must be key/ID or alias/NAME (not an AWS-managed alias)");
    }
    if region.is_empty() {
        return Err(AdminError::InvalidArgument(
            "region is required for AWS keys".into(),
        ));
    }
    if region != parts[3] {
        return Err(AdminError::InvalidArgument(format!(
            "region {region:?} does not match the key ARN's region {:?}",
            parts[3]
        )));
    }
    Ok(())
}

/// `arn:aws:iam::ACCOUNT:role/PATH/NAME`.
pub fn validate_role_arn(arn: &str) -> Result<(), AdminError> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && is_aws_partition(parts[1])
        && parts[2] == "iam"
        && parts[3].is_empty()
        && is_account_id(parts[4])
        && parts[5].strip_prefix("role/").is_some_and(|name| {
            !name.is_empty()
                && name.len() <= 512
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/+=,.@_-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(AdminError::InvalidArgument(format!(
            "invalid IAM role ARN {arn:?}: expected arn:aws:iam::ACCOUNT_ID:role/NAME"
        )))
    }
}

/// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
pub fn validate_gcp_key_name(name: &str) -> Result<(), AdminError> {
    let parts: Vec<&str> = name.split('/').collect();
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
    };
    let ok = parts.len() == 8
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "keyRings"
        && parts[6] == "cryptoKeys"
        && [parts[1], parts[3], parts[5], parts[7]]
            .iter()
            .all(|s| segment_ok(s));
    if ok {
        Ok(())
    } else {
        Err(AdminError::InvalidArgument(format!(
            "invalid Cloud KMS key name {name:?}: expected projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY"
        )))
    }
}

fn validate_service_account(email: &str) -> Result<(), AdminError> {
    let ok = email.ends_with(".iam.gserviceaccount.com")
        && email.split('@').count() == 2
        && email.len() <= 254;
    if ok {
        Ok(())
    } else {
        Err(AdminError::InvalidArgument(format!(
            "invalid service account {email:?}: expected NAME@PROJECT.iam.gserviceaccount.com"
        )))
    }
}

/// Exactly 32 bytes in canonical standard base64.
pub fn decode_key_material(text: &str) -> Result<SecretBytes, AdminError> {
    let bytes = B64.decode(text.as_bytes()).map_err(|_| {
        AdminError::InvalidArgument(
            "key_material_base64 is not canonical standard base64 (A-Z a-z 0-9 + /, = padding, no whitespace)".into(),
        )
    })?;
    let material = SecretBytes::new(bytes);
    if material.len() != 32 {
        return Err(AdminError::InvalidArgument(format!(
            "key material must be exactly 32 bytes (AES-256), got {}",
            material.len()
        )));
    }
    Ok(material)
}

fn probe_wrap<'a>(
    tenant_id: &'a str,
    context: &'a envelope::Context,
) -> crate::kms::WrapContext<'a> {
    crate::kms::WrapContext { tenant_id, context }
}

/// A real round trip through the provider before a key is accepted: the key
/// is enabled and customer managed, and a random probe encrypts and decrypts
/// under the tenant's binding. Returns the probe's ciphertext.
async fn verify_provider(
    provider: &dyn crate::kms::KeyProvider,
    tenant_id: &str,
) -> Result<crate::kms::Ciphertext, AdminError> {
    use crate::kms::ProviderKeyState;
    let failed = |e: crate::kms::ProviderError| AdminError::Verification(e.to_string());
    let description = provider.describe("").await.map_err(failed)?;
    tracing::info!(
        tenant = tenant_id,
        provider = %provider.kind(),
        state = ?description.state,
        version = %description.current_version,
        rotation_enabled = ?description.rotation_enabled,
        rotation_period = ?description.rotation_period,
        protection_level = ?description.protection_level,
        "verifying a key to link"
    );
    if description.state != ProviderKeyState::Enabled {
        return Err(AdminError::Verification(format!(
            "the key is {:?}; enable it in the key provider first",
            description.state
        )));
    }
    if description.key_manager.as_deref() == Some("AWS") {
        return Err(AdminError::Verification(
            "AWS-managed keys cannot be shared; create a customer managed key".into(),
        ));
    }
    let probe = SecretBytes::random(32)
        .map_err(|_| AdminError::Internal("system random generator failed".into()))?;
    let context = envelope::Context::default();
    let ciphertext = provider
        .encrypt("", &probe, probe_wrap(tenant_id, &context))
        .await
        .map_err(failed)?;
    let back = provider
        .decrypt(
            "",
            &ciphertext.key_version,
            &ciphertext.bytes,
            probe_wrap(tenant_id, &context),
        )
        .await
        .map_err(failed)?;
    if back != probe {
        return Err(AdminError::Verification(
            "the round trip returned other bytes".into(),
        ));
    }
    Ok(ciphertext)
}

/// Replica regions must be regions other than the key's, and the key must be
/// named by key ARN (aliases are per region). Whether a replica really exists
/// is proved at link time by a decrypt in each replica region.
fn validate_replica_regions(
    key_arn: &str,
    region: &str,
    replicas: &[String],
) -> Result<(), AdminError> {
    if replicas.is_empty() {
        return Ok(());
    }
    if !key_arn.contains(":key/") {
        return Err(AdminError::InvalidArgument(
            "replica_regions need a key ARN (key/mrk-...), not an alias: aliases are per region"
                .into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for r in replicas {
        if !is_region(r) || r == region || !seen.insert(r) {
            return Err(AdminError::InvalidArgument(format!(
                "replica region {r:?} is not a region other than the key's ({region}), or is listed twice"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["k1", "prod-2026.a_b", "A"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "platform", "-x", "a b", "ä", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn aws_arns() {
        validate_aws_key_arn(
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "us-east-1",
        )
        .unwrap();
        validate_aws_key_arn("arn:aws:kms:eu-west-1:111122223333:alias/prod", "eu-west-1").unwrap();
        for (arn, region) in [
            ("arn:aws:kms:us-east-1:1111:key/x", "us-east-1"),
            ("arn:aws:s3:us-east-1:111122223333:key/x", "us-east-1"),
            ("arn:aws:kms:us-east-1:111122223333:key/", "us-east-1"),
            (
                "arn:aws:kms:us-east-1:111122223333:alias/aws/ebs",
                "us-east-1",
            ),
            ("arn:aws:kms:us-east-1:111122223333:key/x", "eu-west-1"),
            ("key/x", "us-east-1"),
        ] {
            assert!(validate_aws_key_arn(arn, region).is_err(), "{arn}");
        }
        validate_role_arn("arn:aws:iam::111122223333:role/keybroker-access").unwrap();
        assert!(validate_role_arn("arn:aws:iam::111122223333:user/bob").is_err());
    }

    #[test]
    fn gcp_names() {
        validate_gcp_key_name("projects/p1/locations/global/keyRings/r/cryptoKeys/k").unwrap();
        assert!(validate_gcp_key_name("projects/p1/locations/global/keyRings/r").is_err());
        assert!(
            validate_gcp_key_name("projects//locations/global/keyRings/r/cryptoKeys/k").is_err()
        );
    }

    #[test]
    fn key_material() {
        let ok = B64.encode([7u8; 32]);
        assert_eq!(decode_key_material(&ok).unwrap().len(), 32);
        for bad in [
            B64.encode([7u8; 31]),
            B64.encode([7u8; 33]),
            format!("{ok}\n"),
            ok.replace('=', ""),
            "not base64!".into(),
        ] {
            assert!(decode_key_material(&bad).is_err(), "{bad:?}");
        }
    }
}
