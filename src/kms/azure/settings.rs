//! The `azure_*` settings.

use super::*;

pub(super) const DEFAULT_DOMAINS: &str = "vault.azure.net,managedhsm.azure.net,vault.azure.cn,managedhsm.azure.cn,vault.usgovcloudapi.net,managedhsm.usgovcloudapi.net";

crate::settings::identity_cache_flags!(
    AzureIdentityCache,
    "azure",
    "AZURE",
    "customer tenants' credentials (with their Key Vault clients)"
);

/// The `azure_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct AzureSettings {
    /// The platform's multi-tenant Entra application (client) id that
    /// customers consent to. Unset: no Azure keys.
    #[arg(
        id = "azure_client_id",
        long = "azure-client-id",
        env = "KEYBROKER_AZURE_CLIENT_ID"
    )]
    pub client_id: Option<String>,
    /// File holding the application's client secret.
    #[arg(
        id = "azure_client_secret_file",
        long = "azure-client-secret-file",
        env = "KEYBROKER_AZURE_CLIENT_SECRET_FILE"
    )]
    pub client_secret_file: Option<std::path::PathBuf>,
    /// File holding a federated client assertion (a workload identity
    /// token, re-read for every token request), instead of a secret.
    #[arg(
        id = "azure_federated_token_file",
        long = "azure-federated-token-file",
        env = "KEYBROKER_AZURE_FEDERATED_TOKEN_FILE"
    )]
    pub federated_token_file: Option<std::path::PathBuf>,
    /// The Entra authority.
    #[arg(
        id = "azure_authority_host",
        long = "azure-authority-host",
        env = "KEYBROKER_AZURE_AUTHORITY_HOST",
        default_value = "https://login.microsoftonline.com"
    )]
    pub authority_host: String,
    /// Hosts a key reference may name (the host or a subdomain): keybroker
    /// sends the customer tenant's token there.
    #[arg(
        id = "azure_vault_domains",
        long = "azure-vault-domains",
        env = "KEYBROKER_AZURE_VAULT_DOMAINS",
        value_delimiter = ',',
        default_value = DEFAULT_DOMAINS
    )]
    pub vault_domains: Vec<String>,
    /// Extra CA certificate (PEM) trusted for Key Vault and Entra, besides
    /// the system's roots (a private endpoint's proxy; the tests' fake).
    #[arg(
        id = "azure_ca_file",
        long = "azure-ca-file",
        env = "KEYBROKER_AZURE_CA_FILE"
    )]
    pub ca_file: Option<std::path::PathBuf>,
    /// HTTPS proxy (an egress proxy) for Entra and Key Vault traffic
    /// [default: HTTPS_PROXY, if set].
    #[arg(
        id = "azure_proxy",
        long = "azure-proxy",
        env = "KEYBROKER_AZURE_PROXY"
    )]
    pub proxy: Option<String>,
    /// Deadline of one Key Vault or Entra request.
    #[arg(id = "azure_request_timeout", long = "azure-request-timeout", env = "KEYBROKER_AZURE_REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub request_timeout: Duration,
    /// Attempts per call, the first included (throttling and 5xx retry).
    #[arg(
        id = "azure_max_attempts",
        long = "azure-max-attempts",
        env = "KEYBROKER_AZURE_MAX_ATTEMPTS",
        default_value = "3"
    )]
    pub max_attempts: u32,
    /// The longest `Retry-After` waited for; a longer one fails the call at
    /// once with RESOURCE_EXHAUSTED naming the delay.
    #[arg(id = "azure_max_retry_delay", long = "azure-max-retry-delay", env = "KEYBROKER_AZURE_MAX_RETRY_DELAY", value_parser = humantime::parse_duration, default_value = "2s")]
    pub max_retry_delay: Duration,
    #[command(flatten)]
    pub identity: AzureIdentityCache,
}

impl Default for AzureSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl AzureSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return invalid("azure_max_attempts", "must be 1 to 10");
        }
        if self.request_timeout.is_zero() {
            return invalid("azure_request_timeout", "must be longer than zero");
        }
        if !self.authority_host.starts_with("https://") {
            return invalid("azure_authority_host", "must be an https:// URL");
        }
        if self.vault_domains.iter().any(|d| d.trim().is_empty()) {
            return invalid("azure_vault_domains", "must not hold an empty domain");
        }
        if self.client_id.is_some()
            && self.client_secret_file.is_some() == self.federated_token_file.is_some()
        {
            return invalid(
                "azure_client_id",
                "needs exactly one of azure_client_secret_file and azure_federated_token_file",
            );
        }
        self.identity.validate()?;
        Ok(())
    }
}
