//! LinkKey and ImportKeyMaterial: a key is accepted only once it proved it
//! works, that it is the tenant's, and that the tenant's keys can move to it.

use secrecy::ExposeSecret as _;

use super::*;

impl Admin {
    /// Links a cloud KMS key. Input is validated fully; the cloud providers
    /// themselves arrive with their own issues.
    pub async fn link_key(&self, req: LinkRequest) -> Result<KeyView, AdminError> {
        let provider = validation::check_link(&req)?;
        // The tenant must exist before anything is verified.
        let tenant = self.live_tenant(&req.tenant_id).await?;
        self.refuse_key_of_another_tenant(&req.tenant_id, provider, &req.key_reference)
            .await?;
        let mut record = NewBinding {
            tenant_id: req.tenant_id.to_string(),
            name: req.name.to_string(),
            description: req.description,
            provider,
            key_reference: req.key_reference,
            region: req.region,
            role_arn: req.role_arn,
            service_account: req.service_account,
            replica_regions: req.replica_regions,
            key_material: None,
            make_primary: req.make_primary,
            canary: None,
        };
        let canary = match provider {
            ProviderKind::AwsKms => {
                let target = crate::registry::directory::aws_target(
                    &BindingRecord::from_new(&record),
                    &tenant.external_id,
                )?;
                let key = self.directory.aws().key(target);
                let probe = verify_provider(&key, &req.tenant_id, None).await?;
                let canary = canary_context();
                key.check_replicas(&probe.bytes, probe_wrap(&req.tenant_id, &canary))
                    .await
                    .map_err(AdminError::Provider)?;
                probe
            }
            ProviderKind::GcpKms => {
                let target =
                    crate::registry::directory::gcp_target(&BindingRecord::from_new(&record))?;
                let owner = Ownership {
                    external_id: &tenant.external_id,
                    what: "label",
                    command: target
                        .key_name
                        .label_command(crate::kms::OWNER_TAG, &tenant.external_id),
                };
                let key = self.directory.gcp().key(target);
                verify_provider(&key, &req.tenant_id, Some(&owner)).await?
            }
            ProviderKind::VaultTransit if req.vault_jwt.is_some() => {
                if !self.directory.vault()?.has_issuer() {
                    return Err(AdminError::Refused(
                        "this server mints no login tokens for Vault jwt roles (no oidc_issuer): the operator sets oidc_issuer, or link the key with an AppRole".into(),
                    ));
                }
                let jwt = req.vault_jwt.clone().unwrap_or_default();
                record.role_arn = jwt.role;
                record.service_account = if jwt.mount.is_empty() {
                    "jwt".into()
                } else {
                    jwt.mount
                };
                let target = crate::registry::directory::vault_target(
                    &BindingRecord::from_new(&record),
                    None,
                )?;
                let key = self.directory.vault()?.key(target);
                verify_provider(&key, &req.tenant_id, None).await?
            }
            ProviderKind::VaultTransit => {
                // check_link made sure a Vault key has a login.
                let approle = req.vault.clone().ok_or_else(|| {
                    AdminError::InvalidArgument(
                        "a Vault key needs vault_approle or vault_jwt".into(),
                    )
                })?;
                record.role_arn = approle.role_id.clone();
                record.service_account = if approle.mount.is_empty() {
                    "approle".into()
                } else {
                    approle.mount.clone()
                };
                let target = crate::registry::directory::vault_target(
                    &BindingRecord::from_new(&record),
                    Some(approle.secret_id.clone()),
                )?;
                let key = self.directory.vault()?.key(target);
                let probe = verify_provider(&key, &req.tenant_id, None).await?;
                // The secret_id, like imported material, only ever rests
                // encrypted under the platform key.
                let sealed = seal_material(
                    self.directory.platform_keyring(),
                    &req.tenant_id,
                    &req.name,
                    &SecretBytes::new(approle.secret_id.expose_secret().as_bytes().to_vec()),
                )
                .await?;
                record.key_material = Some(sealed);
                probe
            }
            ProviderKind::AzureKeyVault => {
                record.role_arn = req.azure_tenant_id.clone();
                let azure = self.directory.azure()?;
                let key = crate::registry::directory::azure_key(
                    azure,
                    &BindingRecord::from_new(&record),
                )?;
                let owner = Ownership {
                    external_id: &tenant.external_id,
                    what: "tag",
                    command: key
                        .reference()
                        .tag_command(crate::kms::OWNER_TAG, &tenant.external_id),
                };
                let probe = verify_provider(&key, &req.tenant_id, Some(&owner)).await?;
                let budget = crate::kms::budget::wrap_budget(
                    provider,
                    crate::kms::azure::wraps_with_rsa(&probe.bytes),
                );
                if tenant.key_hierarchy == KeyHierarchy::Direct && !budget.serves_direct_tenants() {
                    return Err(AdminError::Refused(format!(
                        "{} is an RSA key ({}), so it cannot vouch for a DEK wrapped directly; RSA keys protect tenant keys only (a tenant created with key_hierarchy TENANT_KEY), or use a Managed HSM AES key",
                        record.key_reference, budget.why
                    )));
                }
                probe
            }
            ProviderKind::Pkcs11 => {
                let key = crate::kms::pkcs11::Pkcs11KeyRef::parse(&record.key_reference)?;
                let budget = crate::kms::budget::wrap_budget(provider, false);
                if tenant.key_hierarchy == KeyHierarchy::Direct && !budget.serves_direct_tenants() {
                    return Err(AdminError::Refused(format!(
                        "PKCS#11 keys protect tenant keys only: {}, which a tenant's DEKs wrapped directly would spend in days; create the tenant with key_hierarchy TENANT_KEY (a few wraps per rotation period reach the HSM)",
                        budget.why
                    )));
                }
                let hsm = self.directory.pkcs11()?;
                // Before anything reaches the HSM: the PIN unlocks every
                // object, so the label is what proves the key is theirs.
                hsm.check_owner(&req.tenant_id, &key)
                    .map_err(AdminError::Refused)?;
                let key = hsm.key(key);
                verify_provider(&key, &req.tenant_id, None).await?
            }
            ProviderKind::Local => {
                return Err(AdminError::Internal(
                    "local keys are linked with ImportKeyMaterial".into(),
                ));
            }
        };
        record.canary = Some(canary_envelope(&record, canary));
        self.check_can_take_over(&record).await?;
        let stored = self.registry().insert_binding(&record, now_ms()).await?;
        self.directory.changed(&req.tenant_id, None).await;
        self.after_new_primary(&stored).await?;
        Ok(self.view(stored))
    }

    /// Imports raw AES-256 key material as a `local` key (Cube's flow), after
    /// a wrap/unwrap round trip with it.
    pub async fn import_key_material(
        &self,
        req: LinkRequest,
        material: SecretBytes,
    ) -> Result<KeyView, AdminError> {
        validate_tenant(&req.tenant_id)?;
        validate_name(&req.name)?;
        validate_description(&req.description)?;
        let tenant = self.live_tenant(&req.tenant_id).await?;
        self.refuse_duplicate_material(&req.tenant_id, &material)
            .await?;
        let keyring = crate::kms::local::LocalKeyring::from_material(
            "verification",
            std::slice::from_ref(&material),
        )
        .map_err(|e| AdminError::Verification(e.to_string()))?;
        // No canary: a key keybroker holds has no customer side to lose.
        verify_provider(&keyring, &req.tenant_id, None).await?;
        let sealed = seal_material(
            self.directory.platform_keyring(),
            &req.tenant_id,
            &req.name,
            &material,
        )
        .await?;
        let record = NewBinding {
            tenant_id: req.tenant_id.to_string(),
            name: req.name.to_string(),
            description: req.description,
            provider: ProviderKind::Local,
            key_reference: format!("local:{}/{}", req.tenant_id, req.name),
            region: String::new(),
            role_arn: String::new(),
            service_account: String::new(),
            replica_regions: Vec::new(),
            key_material: Some(sealed),
            make_primary: req.make_primary || tenant.newest_import_primary,
            canary: None,
        };
        self.check_can_take_over(&record).await?;
        let record = self.registry().insert_binding(&record, now_ms()).await?;
        self.directory.changed(&req.tenant_id, None).await;
        self.after_new_primary(&record).await?;
        Ok(self.view(record))
    }

    /// Refuses material the tenant already imported under another name: two
    /// bindings of one key would make unlinking one a false comfort.
    pub(super) async fn refuse_duplicate_material(
        &self,
        tenant_id: &str,
        material: &SecretBytes,
    ) -> Result<(), AdminError> {
        for record in self.registry().bindings(tenant_id).await? {
            // Only imported material: a Vault AppRole binding keeps its
            // sealed secret_id in the same column, which is no key.
            let (ProviderKind::Local, Some(sealed)) =
                (record.provider, record.key_material.as_deref())
            else {
                continue;
            };
            let existing = crate::registry::directory::open_material(
                self.directory.platform_keyring(),
                tenant_id,
                &record.name,
                sealed,
            )
            .await?;
            let versions = crate::registry::directory::material_versions(&existing)?;
            if versions.iter().any(|v| v == material) {
                return Err(AdminError::InvalidArgument(format!(
                    "this key material is already imported for tenant '{tenant_id}' as key '{}'",
                    record.name
                )));
            }
        }
        Ok(())
    }

    /// A cloud key (AWS, Cloud KMS, Key Vault: names unique in the world)
    /// already linked by another tenant is refused before any provider call:
    /// one customer key serves one tenant, so no tenant couples its
    /// revocations to another's or spends another's quota. Which tenant holds
    /// it is not said. (Vault and PKCS#11 names are unique only per server or
    /// per tenant namespace, and are scoped by their logins and labels.)
    pub(super) async fn refuse_key_of_another_tenant(
        &self,
        tenant_id: &str,
        provider: ProviderKind,
        key_reference: &str,
    ) -> Result<(), AdminError> {
        if !matches!(
            provider,
            ProviderKind::AwsKms | ProviderKind::GcpKms | ProviderKind::AzureKeyVault
        ) {
            return Ok(());
        }
        let holders = self
            .registry()
            .tenants_linking(provider, key_reference)
            .await?;
        if holders.iter().any(|holder| holder != tenant_id) {
            return Err(AdminError::Refused(format!(
                "{} is linked by another tenant: a customer key serves one tenant only, so that one tenant's revocation never cuts off another and no tenant spends another's quota; create a key for this tenant",
                crate::text::Quoted(key_reference)
            )));
        }
        Ok(())
    }

    /// Refuses a link that would become primary while the tenant's key
    /// versions cannot move to it.
    pub(super) async fn check_can_take_over(&self, record: &NewBinding) -> Result<(), AdminError> {
        let bindings = self.registry().bindings(&record.tenant_id).await?;
        if record.make_primary || !bindings.iter().any(|b| b.primary) {
            self.lifecycle
                .check_can_take_over(&record.tenant_id, &record.name, &bindings)
                .await?;
        }
        Ok(())
    }

    /// A key that became primary (linked as the first CMK, or made primary)
    /// takes over every tenant key version.
    pub(super) async fn after_new_primary(&self, record: &BindingRecord) -> Result<(), AdminError> {
        if record.primary {
            self.change_key(&record.tenant_id, &record.name, None)
                .await?;
        }
        Ok(())
    }
}
