//! `keybroker.v1.KeyAdmin`: converts messages to and from the control plane.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::admin_convert::*;
use crate::api::call;
use crate::api::convert::{hierarchy_to_proto, reencryption_to_proto, timestamp};
use crate::control::{Admin, AdminError, BindingName, LinkRequest};
use crate::kms::ProviderKind;
use crate::proto::{self, key_admin_server::KeyAdmin};
use crate::registry::Tenant;

#[derive(Debug, Clone)]
pub(crate) struct KeyAdminApi {
    admin: Arc<Admin>,
    observers: Arc<crate::api::Observers>,
}

impl KeyAdminApi {
    pub(crate) fn new(admin: Arc<Admin>, observers: Arc<crate::api::Observers>) -> Self {
        Self { admin, observers }
    }

    async fn tenant(&self, tenant: &Tenant) -> Result<proto::Tenant, AdminError> {
        let o = self.admin.onboarding(tenant);
        let reencryption = self.admin.reencryption(tenant).await?;
        let (min_tenant_key_version, tenant_key_usage) = self
            .admin
            .version_usage(&tenant.id, crate::keys::TENANT_KEY_USAGE)
            .await?;
        Ok(proto::Tenant {
            tenant_id: tenant.id.clone(),
            key_policy: policy_to_proto(tenant.key_policy).into(),
            onboarding: Some(proto::Onboarding {
                aws_external_id: o.aws_external_id,
                aws_trust_policy_json: o.aws_trust_policy_json,
                aws_key_policy_statement_json: o.aws_key_policy_statement_json,
                gcp_service_account: o.gcp_service_account,
                gcp_role: o.gcp_role,
                vault_policy_hcl: o.vault_policy_hcl,
                vault_jwt_setup: o.vault_jwt_setup,
                azure_application_id: o.azure_application_id,
                azure_consent_url: o.azure_consent_url,
                azure_role: o.azure_role,
                key_owner_tag: o.key_owner_tag,
            }),
            create_time: Some(timestamp(tenant.created_at_ms)),
            update_time: Some(timestamp(tenant.updated_at_ms)),
            key_hierarchy: hierarchy_to_proto(tenant.key_hierarchy).into(),
            tenant_key_versions: reencryption.versions_total,
            newest_import_primary: tenant.newest_import_primary,
            reencryption: Some(reencryption_to_proto(reencryption)),
            min_tenant_key_version,
            tenant_key_usage: tenant_key_usage.iter().map(version_to_proto).collect(),
            delete_time: tenant.delete_at_ms.map(timestamp),
            incarnation: tenant.incarnation,
            implicit: tenant.implicit,
            access_policy: Some(access_policy_to_proto(&tenant.access_policy)),
        })
    }
}

#[tonic::async_trait]
impl KeyAdmin for KeyAdminApi {
    async fn create_tenant(
        &self,
        request: Request<proto::CreateTenantRequest>,
    ) -> Result<Response<proto::CreateTenantResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let policy = policy_from_proto(req.key_policy, false)?;
            let hierarchy = hierarchy_from_proto(req.key_hierarchy)?;
            let tenant = self
                .admin
                .create_tenant(
                    &tenant_id(&req.tenant_id)?,
                    policy,
                    hierarchy,
                    req.newest_import_primary,
                )
                .await?;
            Ok(proto::CreateTenantResponse {
                tenant: Some(self.tenant(&tenant).await?),
            })
        })
        .await
    }

    async fn get_tenant(
        &self,
        request: Request<proto::GetTenantRequest>,
    ) -> Result<Response<proto::GetTenantResponse>, Status> {
        call::serve(&self.observers, request, |request| async move {
            let tenant = self.admin.tenant(&tenant_id(&request.tenant_id)?).await?;
            Ok(proto::GetTenantResponse {
                tenant: Some(self.tenant(&tenant).await?),
            })
        })
        .await
    }

    async fn set_tenant_policy(
        &self,
        request: Request<proto::SetTenantPolicyRequest>,
    ) -> Result<Response<proto::SetTenantPolicyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let policy = policy_from_proto(req.key_policy, true)?
                .ok_or_else(|| AdminError::InvalidArgument("key_policy is required".into()))?;
            let tenant = self
                .admin
                .set_policy(&tenant_id(&req.tenant_id)?, policy)
                .await?;
            Ok(proto::SetTenantPolicyResponse {
                tenant: Some(self.tenant(&tenant).await?),
            })
        })
        .await
    }

    async fn set_access_policy(
        &self,
        request: Request<proto::SetAccessPolicyRequest>,
    ) -> Result<Response<proto::SetAccessPolicyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let policy = access_policy_from_proto(req.access_policy)?;
            let tenant = self
                .admin
                .set_access_policy(&tenant_id(&req.tenant_id)?, &policy)
                .await?;
            Ok(proto::SetAccessPolicyResponse {
                tenant: Some(self.tenant(&tenant).await?),
            })
        })
        .await
    }

    async fn list_key_access(
        &self,
        request: Request<proto::ListKeyAccessRequest>,
    ) -> Result<Response<proto::ListKeyAccessResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let query = access_query(&req)?;
            let page = self.admin.key_access(query, &req.page_token).await?;
            Ok(proto::ListKeyAccessResponse {
                records: page.records.iter().map(access_record_to_proto).collect(),
                next_page_token: page.next.unwrap_or_default(),
            })
        })
        .await
    }

    async fn link_key(
        &self,
        request: Request<proto::LinkKeyRequest>,
    ) -> Result<Response<proto::LinkKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let provider = proto::Provider::try_from(req.provider)
                .ok()
                .and_then(|p| ProviderKind::try_from(p).ok());
            let view = self
                .admin
                .link_key(LinkRequest {
                    tenant_id: admin_tenant(req.tenant_id)?,
                    name: BindingName::parse(req.name)?,
                    description: req.description,
                    provider,
                    key_reference: req.key_reference,
                    region: req.region,
                    role_arn: req.role_arn,
                    service_account: req.service_account,
                    replica_regions: req.replica_regions,
                    make_primary: req.make_primary,
                    vault: req.vault_approle.map(|a| crate::control::VaultAppRole {
                        mount: a.mount,
                        role_id: a.role_id,
                        secret_id: a.secret_id.into(),
                    }),
                    azure_tenant_id: req.azure_tenant_id,
                    vault_jwt: req.vault_jwt.map(|j| crate::control::VaultJwtRole {
                        mount: j.mount,
                        role: j.role,
                    }),
                })
                .await?;
            Ok(proto::LinkKeyResponse {
                key: Some(key_to_proto(&view)),
            })
        })
        .await
    }

    async fn import_key_material(
        &self,
        request: Request<proto::ImportKeyMaterialRequest>,
    ) -> Result<Response<proto::ImportKeyMaterialResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let tenant_id = admin_tenant(req.tenant_id)?;
            let name = BindingName::parse(req.name)?;
            // Moved into a zeroizing string at once; the request is dropped here.
            let raw = zeroize::Zeroizing::new(req.key_material_base64);
            let material = match (raw.is_empty(), req.import_token.is_empty()) {
                (false, true) => crate::control::decode_key_material(&raw)?,
                (true, false) => {
                    self.admin
                        .unwrap_imported(
                            &tenant_id,
                            &name,
                            &req.import_token,
                            &req.wrapped_key_material,
                        )
                        .await?
                }
                _ => {
                    return Err(AdminError::InvalidArgument(
                        "give either key_material_base64, or wrapped_key_material with its import_token"
                            .into(),
                    )
                    .into());
                }
            };
            if req.new_version {
                let view = self
                    .admin
                    .import_key_version(&tenant_id, &name, material)
                    .await?;
                return Ok(proto::ImportKeyMaterialResponse {
                    key: Some(key_to_proto(&view)),
                });
            }
            let view = self
                .admin
                .import_key_material(
                    LinkRequest {
                        description: req.description,
                        provider: Some(ProviderKind::Local),
                        make_primary: req.make_primary,
                        ..LinkRequest::new(tenant_id, name)
                    },
                    material,
                )
                .await?;
            Ok(proto::ImportKeyMaterialResponse {
                key: Some(key_to_proto(&view)),
            })
        })
        .await
    }

    async fn get_import_parameters(
        &self,
        request: Request<proto::GetImportParametersRequest>,
    ) -> Result<Response<proto::GetImportParametersResponse>, Status> {
        use crate::wrapping::Wrapping;
        call::serve(&self.observers, request, |req| async move {
            let wrapping = match proto::WrappingAlgorithm::try_from(req.wrapping_algorithm) {
                Ok(
                    proto::WrappingAlgorithm::Unspecified
                    | proto::WrappingAlgorithm::RsaesOaepSha256,
                ) => Wrapping::RsaesOaepSha256,
                Ok(proto::WrappingAlgorithm::RsaAesKeyWrapSha256) => Wrapping::RsaAesKeyWrapSha256,
                Err(_) => {
                    return Err(AdminError::InvalidArgument(format!(
                        "wrapping_algorithm {} is not RSAES_OAEP_SHA_256 or RSA_AES_KEY_WRAP_SHA_256",
                        req.wrapping_algorithm
                    ))
                    .into());
                }
            };
            let bits = match req.wrapping_key_bits {
                0 | 3072 => 3072,
                4096 => 4096,
                other => {
                    return Err(AdminError::InvalidArgument(format!(
                        "wrapping_key_bits {other}: use 3072 or 4096"
                    ))
                    .into());
                }
            };
            let (tenant_id, name) = (
                admin_tenant(req.tenant_id)?,
                BindingName::parse(req.name)?,
            );
            let params = self
                .admin
                .import_parameters(&tenant_id, &name, wrapping, bits)
                .await?;
            Ok(proto::GetImportParametersResponse {
                import_token: params.token,
                public_key_pem: params.public_key_pem,
                wrapping_algorithm: match params.wrapping {
                    Wrapping::RsaesOaepSha256 => proto::WrappingAlgorithm::RsaesOaepSha256,
                    Wrapping::RsaAesKeyWrapSha256 => proto::WrappingAlgorithm::RsaAesKeyWrapSha256,
                }
                .into(),
                expire_time: Some(timestamp(params.expires_at_ms)),
                tenant_id: tenant_id.to_string(),
                name: name.to_string(),
            })
        })
        .await
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        call::serve(&self.observers, request, |request| async move {
            let keys = self
                .admin
                .list_keys(&tenant_id(&request.tenant_id)?)
                .await?;
            Ok(proto::ListKeysResponse {
                keys: keys.iter().map(key_to_proto).collect(),
            })
        })
        .await
    }

    async fn get_key(
        &self,
        request: Request<proto::GetKeyRequest>,
    ) -> Result<Response<proto::GetKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let view = self
                .admin
                .get_key(&tenant_id(&req.tenant_id)?, &req.name)
                .await?;
            Ok(proto::GetKeyResponse {
                key: Some(key_to_proto(&view)),
            })
        })
        .await
    }

    async fn set_primary_key(
        &self,
        request: Request<proto::SetPrimaryKeyRequest>,
    ) -> Result<Response<proto::SetPrimaryKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let view = self
                .admin
                .set_primary(&tenant_id(&req.tenant_id)?, &req.name)
                .await?;
            Ok(proto::SetPrimaryKeyResponse {
                key: Some(key_to_proto(&view)),
            })
        })
        .await
    }

    async fn disable_key(
        &self,
        request: Request<proto::DisableKeyRequest>,
    ) -> Result<Response<proto::DisableKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let view = self
                .admin
                .disable_key(
                    &tenant_id(&req.tenant_id)?,
                    &req.name,
                    &req.reason,
                    Some(req.reencrypt_to.as_str()).filter(|t| !t.is_empty()),
                )
                .await?;
            Ok(proto::DisableKeyResponse {
                key: Some(key_to_proto(&view)),
            })
        })
        .await
    }

    async fn enable_key(
        &self,
        request: Request<proto::EnableKeyRequest>,
    ) -> Result<Response<proto::EnableKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let view = self
                .admin
                .enable_key(&tenant_id(&req.tenant_id)?, &req.name)
                .await?;
            Ok(proto::EnableKeyResponse {
                key: Some(key_to_proto(&view)),
            })
        })
        .await
    }

    async fn unlink_key(
        &self,
        request: Request<proto::UnlinkKeyRequest>,
    ) -> Result<Response<proto::UnlinkKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let unlinked = self
                .admin
                .unlink_key(&tenant_id(&req.tenant_id)?, &req.name, req.force)
                .await?;
            Ok(proto::UnlinkKeyResponse {
                tenant_key_versions_destroyed: unlinked.versions_destroyed,
            })
        })
        .await
    }

    async fn update_key(
        &self,
        request: Request<proto::UpdateKeyRequest>,
    ) -> Result<Response<proto::UpdateKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let view = self
                .admin
                .update_key(&tenant_id(&req.tenant_id)?, &req.name, &req.description)
                .await?;
            Ok(proto::UpdateKeyResponse {
                key: Some(key_to_proto(&view)),
            })
        })
        .await
    }

    async fn delete_tenant(
        &self,
        request: Request<proto::DeleteTenantRequest>,
    ) -> Result<Response<proto::DeleteTenantResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let window = req
                .restore_window
                .map(|d| {
                    std::time::Duration::try_from(d).map_err(|_| {
                        AdminError::InvalidArgument(
                            "restore_window must be zero or positive".into(),
                        )
                    })
                })
                .transpose()?;
            let scheduled = self
                .admin
                .delete_tenant(&tenant_id(&req.tenant_id)?, req.force, window)
                .await?;
            Ok(proto::DeleteTenantResponse {
                delete_time: Some(timestamp(scheduled.delete_at_ms)),
                deleted: scheduled.shredded,
            })
        })
        .await
    }

    async fn cancel_tenant_deletion(
        &self,
        request: Request<proto::CancelTenantDeletionRequest>,
    ) -> Result<Response<proto::CancelTenantDeletionResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let tenant = self
                .admin
                .cancel_deletion(&tenant_id(&req.tenant_id)?)
                .await?;
            Ok(proto::CancelTenantDeletionResponse {
                tenant: Some(self.tenant(&tenant).await?),
            })
        })
        .await
    }

    async fn retire_key_versions(
        &self,
        request: Request<proto::RetireKeyVersionsRequest>,
    ) -> Result<Response<proto::RetireKeyVersionsResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let target = retire_target(&req)?;
            let retired = self
                .admin
                .retire_versions(
                    &req.tenant_id,
                    target,
                    req.min_decryption_version,
                    req.force,
                )
                .await?;
            Ok(proto::RetireKeyVersionsResponse {
                min_decryption_version: retired.min_version,
                retired_versions: retired.retired_versions,
                rewrapped: retired.rewrapped,
            })
        })
        .await
    }
}
