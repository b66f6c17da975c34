//! `admin key` commands: a tenant's customer keys, through KeyAdmin.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};

use super::connection::TenantChannel;
use super::output::{Answer, binding_json, one_key};
use crate::proto;
use crate::proto::key_admin_client::KeyAdminClient;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum CloudProviderArg {
    AwsKms,
    GcpKms,
    VaultTransit,
    Pkcs11,
    AzureKv,
}

#[derive(Debug, clap::Args)]
pub(super) struct KeyName {
    #[arg(long)]
    pub(super) tenant: String,
    /// Key binding name.
    #[arg(long)]
    pub(super) name: String,
}

// One value per process, already boxed by its parent: Link's size costs
// nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(super) enum KeyCommand {
    /// Link a key in AWS KMS, Google Cloud KMS, Azure Key Vault, a PKCS#11
    /// HSM or Vault/OpenBao Transit
    /// (verified before it is accepted).
    Link {
        #[command(flatten)]
        key: KeyName,
        #[arg(long, value_enum)]
        provider: CloudProviderArg,
        /// Key ARN / alias ARN, CryptoKey resource name, or Transit key URL
        /// (https://HOST:8200/v1/<mount>/keys/<name>).
        #[arg(long)]
        key_reference: String,
        #[arg(long, default_value = "")]
        region: String,
        #[arg(long, default_value = "")]
        role_arn: String,
        #[arg(long, default_value = "")]
        service_account: String,
        /// AWS multi-Region key replica region, repeatable.
        #[arg(long = "replica-region")]
        replica_regions: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Make it the primary key.
        #[arg(long)]
        primary: bool,
        /// Vault: the AppRole role_id keybroker logs in with.
        #[arg(long, default_value = "")]
        vault_role_id: String,
        /// Vault: file holding the AppRole secret_id (`-` for stdin). Not a
        /// flag value: command lines are visible to other users.
        #[arg(long)]
        vault_secret_id_file: Option<PathBuf>,
        /// Vault, instead of an AppRole: the customer's jwt auth role that
        /// trusts the platform's identity token.
        #[arg(long, conflicts_with_all = ["vault_role_id", "vault_secret_id_file"])]
        vault_jwt_role: Option<String>,
        /// Vault: the auth mount path [default: approle, or jwt with
        /// --vault-jwt-role].
        #[arg(long)]
        vault_auth_mount: Option<String>,
        /// Azure: the customer's Entra tenant (directory) id.
        #[arg(long, default_value = "")]
        azure_tenant_id: String,
    },
    /// Import AES-256 key material (32 bytes) as a local key: raw (base64),
    /// or wrapped to the public key of `import-parameters` (--wrap-with).
    Import {
        #[command(flatten)]
        key: KeyName,
        /// File holding the base64 key material (`-` for stdin). Not a flag
        /// value: command lines are visible to other users of the machine.
        /// With --wrap-with it is wrapped here before it is sent.
        #[arg(long, required_unless_present = "wrapped_material_file")]
        material_file: Option<PathBuf>,
        /// The parameters `import-parameters` wrote: the material is sent
        /// wrapped to their public key, with their token.
        #[arg(long)]
        wrap_with: Option<PathBuf>,
        /// Material wrapped already (raw bytes, e.g. by openssl pkeyutl;
        /// see docs/keys.md), for --wrap-with's token.
        #[arg(long, requires = "wrap_with", conflicts_with = "material_file")]
        wrapped_material_file: Option<PathBuf>,
        #[arg(long, default_value = "")]
        description: String,
        /// Make it the primary key.
        #[arg(long)]
        primary: bool,
        /// Add the material as the newest version of the existing imported
        /// key (the customer's rotation); older versions unwrap until retired.
        #[arg(long, conflicts_with_all = ["primary", "description"])]
        new_version: bool,
    },
    /// Get a one-time RSA public key and import token for a wrapped
    /// import, written as JSON to --out (for `import --wrap-with`).
    ImportParameters {
        #[command(flatten)]
        key: KeyName,
        #[arg(long, value_enum, default_value = "rsaes-oaep-sha256")]
        wrapping: super::import::WrappingArg,
        /// RSA key size: 3072 or 4096.
        #[arg(long, default_value = "3072")]
        bits: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// List a tenant's keys.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Show one key with live usage counters.
    Get(KeyName),
    /// Make a key the primary (it wraps every new DEK).
    SetPrimary(KeyName),
    /// Disable a key: it unwraps nothing until enabled.
    Disable {
        #[command(flatten)]
        key: KeyName,
        #[arg(long, default_value = "")]
        reason: String,
        /// Re-encrypt the tenant keys it protects under this key (or
        /// `platform`) first; required for the primary of a tenant_key tenant.
        #[arg(long)]
        reencrypt_to: Option<String>,
    },
    /// Change a key's description.
    Update {
        #[command(flatten)]
        key: KeyName,
        #[arg(long)]
        description: String,
    },
    /// Enable a disabled key.
    Enable(KeyName),
    /// Remove a key from the tenant.
    Unlink {
        #[command(flatten)]
        key: KeyName,
        /// Even if it was used recently (what it wrapped becomes unreadable).
        #[arg(long)]
        force: bool,
    },
}

fn read_material(path: &std::path::Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::Read;
    let mut text = zeroize::Zeroizing::new(String::new());
    if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .read_to_string(&mut text)?;
    }
    // A trailing newline from `echo` or an editor is not part of the key.
    let trimmed = zeroize::Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
    Ok(trimmed)
}

pub(super) async fn run(
    client: &mut KeyAdminClient<TenantChannel>,
    command: KeyCommand,
) -> anyhow::Result<Value> {
    let value = match command {
        KeyCommand::Link {
            key,
            provider,
            key_reference,
            region,
            role_arn,
            service_account,
            replica_regions,
            description,
            primary,
            vault_role_id,
            vault_secret_id_file,
            vault_jwt_role,
            vault_auth_mount,
            azure_tenant_id,
        } => {
            let vault_jwt = vault_jwt_role.map(|role| proto::VaultJwt {
                mount: vault_auth_mount.clone().unwrap_or_else(|| "jwt".into()),
                role,
            });
            let vault_approle = match vault_secret_id_file {
                Some(path) => Some(proto::VaultAppRole {
                    mount: vault_auth_mount.unwrap_or_else(|| "approle".into()),
                    role_id: vault_role_id,
                    secret_id: read_material(&path)?.trim().to_owned(),
                }),
                None => None,
            };
            let resp = client
                .link_key(proto::LinkKeyRequest {
                    tenant_id: key.tenant,
                    name: key.name,
                    description,
                    provider: match provider {
                        CloudProviderArg::AwsKms => proto::Provider::AwsKms,
                        CloudProviderArg::GcpKms => proto::Provider::GcpKms,
                        CloudProviderArg::VaultTransit => proto::Provider::VaultTransit,
                        CloudProviderArg::Pkcs11 => proto::Provider::Pkcs11,
                        CloudProviderArg::AzureKv => proto::Provider::AzureKeyVault,
                    }
                    .into(),
                    key_reference,
                    region,
                    role_arn,
                    service_account,
                    make_primary: primary,
                    replica_regions,
                    vault_approle,
                    azure_tenant_id,
                    vault_jwt,
                })
                .await
                .answer()?;
            one_key(resp.key.as_ref())
        }
        KeyCommand::Import {
            key,
            material_file,
            wrap_with,
            wrapped_material_file,
            description,
            primary,
            new_version,
        } => {
            let material = material_file.as_deref().map(read_material).transpose()?;
            let mut request = proto::ImportKeyMaterialRequest {
                tenant_id: key.tenant,
                name: key.name,
                description,
                key_material_base64: String::new(),
                make_primary: primary,
                new_version,
                wrapped_key_material: Vec::new(),
                import_token: String::new(),
            };
            match &wrap_with {
                Some(params) => {
                    let wrapped = super::import::wrap_with(
                        params,
                        material.as_deref().map(String::as_str),
                        wrapped_material_file.as_deref(),
                    )?;
                    anyhow::ensure!(
                        (wrapped.tenant_id.as_str(), wrapped.name.as_str())
                            == (request.tenant_id.as_str(), request.name.as_str()),
                        "{} were issued for tenant '{}' key '{}'",
                        params.display(),
                        wrapped.tenant_id,
                        wrapped.name
                    );
                    request.import_token = wrapped.token;
                    request.wrapped_key_material = wrapped.material;
                }
                None => {
                    request.key_material_base64 = material
                        .as_deref()
                        .map(|m| m.to_string())
                        .unwrap_or_default();
                }
            }
            let resp = client.import_key_material(request).await.answer()?;
            one_key(resp.key.as_ref())
        }
        KeyCommand::ImportParameters {
            key,
            wrapping,
            bits,
            out,
        } => {
            let resp = client
                .get_import_parameters(proto::GetImportParametersRequest {
                    tenant_id: key.tenant,
                    name: key.name,
                    wrapping_algorithm: proto::WrappingAlgorithm::from(wrapping).into(),
                    wrapping_key_bits: bits,
                })
                .await
                .answer()?;
            let params = super::import::parameters_json(&resp);
            std::fs::write(&out, serde_json::to_string_pretty(&params)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
            params
        }
        KeyCommand::List { tenant } => {
            let resp = client
                .list_keys(proto::ListKeysRequest { tenant_id: tenant })
                .await
                .answer()?;
            json!({ "keys": resp.keys.iter().map(binding_json).collect::<Vec<_>>() })
        }
        KeyCommand::Get(key) => {
            let resp = client
                .get_key(proto::GetKeyRequest {
                    tenant_id: key.tenant,
                    name: key.name,
                })
                .await
                .answer()?;
            one_key(resp.key.as_ref())
        }
        KeyCommand::SetPrimary(key) => {
            let resp = client
                .set_primary_key(proto::SetPrimaryKeyRequest {
                    tenant_id: key.tenant,
                    name: key.name,
                })
                .await
                .answer()?;
            one_key(resp.key.as_ref())
        }
        KeyCommand::Disable {
            key,
            reason,
            reencrypt_to,
        } => {
            let resp = client
                .disable_key(proto::DisableKeyRequest {
                    tenant_id: key.tenant,
                    name: key.name,
                    reason,
                    reencrypt_to: reencrypt_to.unwrap_or_default(),
                })
                .await
                .answer()?;
            one_key(resp.key.as_ref())
        }
        KeyCommand::Update { key, description } => {
            let resp = client
                .update_key(proto::UpdateKeyRequest {
                    tenant_id: key.tenant,
                    name: key.name,
                    description,
                })
                .await
                .answer()?;
            one_key(resp.key.as_ref())
        }
        KeyCommand::Enable(key) => {
            let resp = client
                .enable_key(proto::EnableKeyRequest {
                    tenant_id: key.tenant,
                    name: key.name,
                })
                .await
                .answer()?;
            one_key(resp.key.as_ref())
        }
        KeyCommand::Unlink { key, force } => {
            client
                .unlink_key(proto::UnlinkKeyRequest {
                    tenant_id: key.tenant.clone(),
                    name: key.name.clone(),
                    force,
                })
                .await
                .answer()?;
            json!({ "unlinked": { "tenant_id": key.tenant, "name": key.name } })
        }
    };
    Ok(value)
}
