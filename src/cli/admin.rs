//! `admin` commands: tenants and their keys, through the KeyAdmin service.

use clap::Subcommand;
use serde_json::{Value, json};

use super::admin_key::KeyCommand;
use super::connection::channel;
use super::output::{Answer, tenant_json};
use crate::proto;

#[derive(Debug, Subcommand)]
pub(super) enum AdminCommand {
    /// Tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Customer keys of a tenant.
    Key {
        // Boxed: Link's many flags make it far larger than the others.
        #[command(subcommand)]
        command: Box<KeyCommand>,
    },
    /// A tenant's key access log as JSON Lines (who used its keys, why, how,
    /// with what outcome), appended to --out; a summary on stdout.
    AccessLog(Box<super::access_log::AccessLogArgs>),
    /// Retire old versions of a key, the tenant key or the platform keyring:
    /// wrapped keys under an older version than --min-version are refused.
    /// Refused while a retired version was used within the unlink guard
    /// window unless --force; --min-version 0 un-retires.
    RetireVersions {
        /// The tenant (not with --platform-keyring).
        #[arg(long, default_value = "")]
        tenant: String,
        /// A key binding of the tenant.
        #[arg(long, conflicts_with_all = ["tenant_key", "platform_keyring"], required_unless_present_any = ["tenant_key", "platform_keyring"])]
        key: Option<String>,
        /// The tenant's own key versions.
        #[arg(long)]
        tenant_key: bool,
        /// The platform keyring, for every tenant.
        #[arg(long, conflicts_with = "tenant_key")]
        platform_keyring: bool,
        #[arg(long)]
        min_version: u32,
        #[arg(long)]
        force: bool,
    },
}

impl AdminCommand {
    /// The tenant the command is about (`""` for the platform keyring), for
    /// the affinity header.
    fn tenant(&self) -> &str {
        match self {
            Self::Tenant { command } => match command {
                TenantCommand::Create { tenant, .. }
                | TenantCommand::Get { tenant }
                | TenantCommand::SetPolicy { tenant, .. }
                | TenantCommand::SetAccessPolicy { tenant, .. }
                | TenantCommand::Delete { tenant, .. }
                | TenantCommand::CancelDeletion { tenant } => tenant,
            },
            Self::Key { command } => match command.as_ref() {
                KeyCommand::Link { key, .. }
                | KeyCommand::Import { key, .. }
                | KeyCommand::ImportParameters { key, .. }
                | KeyCommand::Get(key)
                | KeyCommand::SetPrimary(key)
                | KeyCommand::Disable { key, .. }
                | KeyCommand::Update { key, .. }
                | KeyCommand::Enable(key)
                | KeyCommand::Unlink { key, .. } => &key.tenant,
                KeyCommand::List { tenant } => tenant,
            },
            Self::RetireVersions { tenant, .. } => tenant,
            Self::AccessLog(args) => &args.tenant,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum PolicyArg {
    Keyring,
    SingleKey,
}

impl From<PolicyArg> for proto::KeyPolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Keyring => Self::Keyring,
            PolicyArg::SingleKey => Self::SingleKey,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum HierarchyArg {
    /// Customer key -> tenant key -> DEKs sealed locally.
    TenantKey,
    /// Every DEK wrapped by the customer's KMS.
    Direct,
}

impl From<HierarchyArg> for proto::KeyHierarchy {
    fn from(h: HierarchyArg) -> Self {
        match h {
            HierarchyArg::TenantKey => Self::TenantKey,
            HierarchyArg::Direct => Self::Direct,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum TenantCommand {
    /// Create a tenant; prints its external ID and onboarding material.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum, default_value = "keyring")]
        policy: PolicyArg,
        /// How its DEKs are wrapped.
        #[arg(long, value_enum, default_value = "tenant-key")]
        hierarchy: HierarchyArg,
        /// Every key imported later becomes the primary.
        #[arg(long)]
        newest_import_primary: bool,
    },
    /// Show a tenant, its onboarding material and any key change under way.
    Get {
        #[arg(long)]
        tenant: String,
    },
    /// Change a tenant's key policy.
    SetPolicy {
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum)]
        policy: PolicyArg,
    },
    /// Set which access reasons the tenant's keys may be used for (the
    /// customer's access policy), replacing the current one. Without
    /// --allow, every reason is accepted.
    SetAccessPolicy {
        #[arg(long)]
        tenant: String,
        /// A reason accepted, repeatable: customer_initiated,
        /// platform_operation, customer_support, platform_review,
        /// legal_request, migration.
        #[arg(long = "allow", value_parser = crate::access::Reason::parse)]
        allow: Vec<crate::access::Reason>,
        /// Refuse calls that give no reason.
        #[arg(long)]
        require_reason: bool,
    },
    /// Schedule a tenant's deletion: refused from now on, its keys (and so
    /// every DEK of it) destroyed when the restore window ends.
    Delete {
        #[arg(long)]
        tenant: String,
        /// Even if its keys were used recently.
        #[arg(long)]
        force: bool,
        /// How long it can be cancelled, e.g. 7days; 0s destroys the keys
        /// now [default: the server's deletion_window].
        #[arg(long, value_parser = humantime::parse_duration)]
        restore_window: Option<std::time::Duration>,
    },
    /// Cancel a scheduled deletion before its time.
    CancelDeletion {
        #[arg(long)]
        tenant: String,
    },
}

pub(super) async fn run(
    server: &super::connection::ServerArg,
    command: AdminCommand,
) -> anyhow::Result<Value> {
    let mut client =
        proto::key_admin_client::KeyAdminClient::new(channel(server, command.tenant()).await?);
    let value = match command {
        AdminCommand::Tenant { command } => match command {
            TenantCommand::Create {
                tenant,
                policy,
                hierarchy,
                newest_import_primary,
            } => {
                let resp = client
                    .create_tenant(proto::CreateTenantRequest {
                        tenant_id: tenant,
                        key_policy: proto::KeyPolicy::from(policy).into(),
                        key_hierarchy: proto::KeyHierarchy::from(hierarchy).into(),
                        newest_import_primary,
                    })
                    .await
                    .answer()?;
                tenant_json(resp.tenant.as_ref())
            }
            TenantCommand::Get { tenant } => {
                let resp = client
                    .get_tenant(proto::GetTenantRequest { tenant_id: tenant })
                    .await
                    .answer()?;
                tenant_json(resp.tenant.as_ref())
            }
            TenantCommand::SetPolicy { tenant, policy } => {
                let resp = client
                    .set_tenant_policy(proto::SetTenantPolicyRequest {
                        tenant_id: tenant,
                        key_policy: proto::KeyPolicy::from(policy).into(),
                    })
                    .await
                    .answer()?;
                tenant_json(resp.tenant.as_ref())
            }
            TenantCommand::SetAccessPolicy {
                tenant,
                allow,
                require_reason,
            } => {
                let resp = client
                    .set_access_policy(proto::SetAccessPolicyRequest {
                        tenant_id: tenant,
                        access_policy: Some(proto::AccessPolicy {
                            require_reason,
                            allowed_reasons: allow.iter().map(|r| r.to_proto()).collect(),
                        }),
                    })
                    .await
                    .answer()?;
                tenant_json(resp.tenant.as_ref())
            }
            TenantCommand::Delete {
                tenant,
                force,
                restore_window,
            } => {
                let resp = client
                    .delete_tenant(proto::DeleteTenantRequest {
                        tenant_id: tenant.clone(),
                        force,
                        restore_window: restore_window
                            .map(prost_types::Duration::try_from)
                            .transpose()
                            .map_err(|e| anyhow::anyhow!("restore window: {e}"))?,
                    })
                    .await
                    .answer()?;
                json!({
                    "tenant_id": tenant,
                    "delete_time": resp.delete_time.map(|t| t.to_string()),
                    "deleted": resp.deleted,
                })
            }
            TenantCommand::CancelDeletion { tenant } => {
                let resp = client
                    .cancel_tenant_deletion(proto::CancelTenantDeletionRequest {
                        tenant_id: tenant,
                    })
                    .await
                    .answer()?;
                tenant_json(resp.tenant.as_ref())
            }
        },
        AdminCommand::Key { command } => super::admin_key::run(&mut client, *command).await?,
        AdminCommand::AccessLog(args) => super::access_log::export(client, *args).await?,
        AdminCommand::RetireVersions {
            tenant,
            key,
            tenant_key,
            platform_keyring,
            min_version,
            force,
        } => {
            let target = if platform_keyring {
                proto::RetireTarget::PlatformKeyring
            } else if tenant_key {
                proto::RetireTarget::TenantKey
            } else {
                proto::RetireTarget::Key
            };
            let resp = client
                .retire_key_versions(proto::RetireKeyVersionsRequest {
                    tenant_id: tenant,
                    target: target.into(),
                    name: key.unwrap_or_default(),
                    min_decryption_version: min_version,
                    force,
                })
                .await
                .answer()?;
            json!({
                "min_decryption_version": resp.min_decryption_version,
                "retired_versions": resp.retired_versions,
                "rewrapped": resp.rewrapped,
            })
        }
    };
    Ok(value)
}
