//! Wrapped key import, the control plane's side: GetImportParameters makes
//! a one-time RSA key for one tenant's key name, seals its private half
//! under the platform keyring (as imported material is sealed) in the
//! registry, and hands out the public half with a token; ImportKeyMaterial
//! with the token redeems it once, on any replica, before it expires.

use std::sync::Arc;

use super::validation::check_key_material;
use super::{Admin, AdminError, now_ms};
use super::{BindingName, TenantId};
use crate::registry::import_tokens::{ImportTokenRecord, Redeemed};
use crate::registry::material::{open_material, seal_material};
use crate::secret::SecretBytes;
use crate::wrapping::{ImportKey, Wrapping};

/// What GetImportParameters returns.
#[derive(Debug, Clone)]
pub struct ImportParameters {
    pub token: String,
    pub public_key_pem: String,
    pub wrapping: Wrapping,
    pub expires_at_ms: i64,
}

/// The name the sealed private key is bound to (never a key name: those
/// cannot hold `#`).
fn sealed_name(token: &str) -> String {
    format!("#import-token:{token}")
}

impl Admin {
    /// A fresh RSA key (3072 or 4096 bits) and token for importing wrapped
    /// material as `name` of `tenant_id`.
    pub async fn import_parameters(
        &self,
        tenant_id: &TenantId,
        name: &BindingName,
        wrapping: Wrapping,
        bits: usize,
    ) -> Result<ImportParameters, AdminError> {
        self.live_tenant(tenant_id).await?;
        // RSA key generation takes tens of milliseconds: off the runtime.
        let key = tokio::task::spawn_blocking(move || ImportKey::generate(bits))
            .await
            .map_err(|e| AdminError::Refused(format!("generating the wrapping key: {e}")))?
            .map_err(|e| AdminError::Refused(e.to_string()))?;
        let mut id = [0u8; 24];
        aws_lc_rs::rand::fill(&mut id)
            .map_err(|_| AdminError::Refused("the system random generator failed".into()))?;
        let token = format!("kbimp-{}", hex::encode(id));
        let keyring = Arc::clone(self.directory.platform_keyring());
        let private = key
            .to_pkcs8()
            .map_err(|e| AdminError::Refused(e.to_string()))?;
        let sealed = seal_material(&keyring, tenant_id, &sealed_name(&token), &private).await?;
        let now = now_ms();
        let ttl = i64::try_from(self.settings.import_token_ttl.as_millis()).unwrap_or(i64::MAX);
        let record = ImportTokenRecord {
            token: token.clone(),
            tenant_id: tenant_id.to_string(),
            name: name.to_string(),
            wrapping: wrapping.as_str().to_owned(),
            sealed_key: sealed,
            created_at_ms: now,
            expires_at_ms: now.saturating_add(ttl),
        };
        self.registry().insert_import_token(&record).await?;
        Ok(ImportParameters {
            token,
            public_key_pem: key
                .public_pem()
                .map_err(|e| AdminError::Refused(e.to_string()))?,
            wrapping,
            expires_at_ms: record.expires_at_ms,
        })
    }

    /// The material inside `wrapped`, through `token` (used up by this call
    /// whatever comes of it), checked as raw material is.
    pub async fn unwrap_imported(
        &self,
        tenant_id: &TenantId,
        name: &BindingName,
        token: &str,
        wrapped: &[u8],
    ) -> Result<SecretBytes, AdminError> {
        let shown = crate::text::Escaped(token);
        let record = match self.registry().redeem_import_token(token, now_ms()).await? {
            Redeemed::Taken(record) => record,
            Redeemed::Unknown => {
                return Err(AdminError::InvalidArgument(format!(
                    "import token {shown} is not one this service issued; call GetImportParameters (kb admin key import-parameters) for one"
                )));
            }
            Redeemed::Expired(at) => {
                return Err(AdminError::Refused(format!(
                    "import token {shown} expired at {}; get new import parameters and wrap the material to their public key",
                    crate::text::rfc3339(at)
                )));
            }
            Redeemed::Used(at) => {
                return Err(AdminError::Refused(format!(
                    "import token {shown} was already used at {}; a token imports once: get new import parameters",
                    crate::text::rfc3339(at)
                )));
            }
        };
        if record.tenant_id != tenant_id.as_str() || record.name != name.as_str() {
            return Err(AdminError::Refused(format!(
                "import token {shown} was issued for another key; it is now used up: get import parameters for tenant '{tenant_id}' key '{name}'"
            )));
        }
        let wrapping: Wrapping = record.wrapping.parse().map_err(|_| {
            AdminError::Refused(format!("import token {shown} names an unknown wrapping"))
        })?;
        let keyring = Arc::clone(self.directory.platform_keyring());
        let private =
            open_material(&keyring, tenant_id, &sealed_name(token), &record.sealed_key).await?;
        let key =
            ImportKey::from_pkcs8(&private).map_err(|e| AdminError::Refused(e.to_string()))?;
        let material = key
            .unwrap(wrapping, wrapped)
            .map_err(|e| AdminError::InvalidArgument(format!("{e}; the token is now used up")))?;
        check_key_material(material)
    }
}
