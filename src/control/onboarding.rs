//! What a customer must configure so keybroker may use their key: the
//! external ID, the IAM trust policy and key-policy statement for AWS, the
//! service account and role for Cloud KMS, the policy for a Vault AppRole,
//! the application, consent URL and role for Azure Key Vault, and the
//! label or tag that proves a Cloud KMS or Key Vault key is the tenant's.

use serde_json::json;

use super::AdminSettings;
use crate::registry::Tenant;

/// What the customer must configure, derived from the tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Onboarding {
    pub aws_external_id: String,
    pub aws_trust_policy_json: String,
    pub aws_key_policy_statement_json: String,
    pub gcp_service_account: String,
    pub gcp_role: String,
    pub vault_policy_hcl: String,
    pub vault_jwt_setup: String,
    pub azure_application_id: String,
    pub azure_consent_url: String,
    pub azure_role: String,
    pub key_owner_tag: String,
}

/// The trust policy, key-policy statement and GCP grant a customer applies
/// so keybroker may use their key.
pub(super) fn onboarding(
    settings: &AdminSettings,
    azure: Option<&crate::kms::azure::AzureSettings>,
    issuer: Option<&crate::kms::issuer::Issuer>,
    tenant: &Tenant,
) -> Onboarding {
    let azure_app = azure.and_then(|a| a.client_id.clone()).unwrap_or_default();
    let authority = azure.map_or("https://login.microsoftonline.com", |a| {
        a.authority_host.as_str()
    });
    let trust_policy = settings.aws_platform_principal.as_ref().map(|principal| {
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
        gcp_service_account: settings.gcp_service_account.clone().unwrap_or_default(),
        gcp_role: crate::kms::gcp::ENCRYPTER_DECRYPTER_ROLE.to_owned(),
        vault_policy_hcl: crate::kms::vault::policy_hcl("<TRANSIT_MOUNT>", "<KEY_NAME>"),
        vault_jwt_setup: issuer
            .map(|i| vault_jwt_setup(i, tenant))
            .unwrap_or_default(),
        azure_consent_url: if azure_app.is_empty() {
            String::new()
        } else {
            crate::kms::azure::consent_url(authority, "<CUSTOMER_TENANT_ID>", &azure_app)
        },
        azure_application_id: azure_app,
        azure_role: crate::kms::azure::KEY_ROLE.to_owned(),
        key_owner_tag: format!("{}={}", crate::kms::OWNER_TAG, tenant.external_id),
    }
}

/// The customer's Vault commands for a jwt role only this tenant's logins,
/// and only logins meant for that Vault, can use.
fn vault_jwt_setup(issuer: &crate::kms::issuer::Issuer, tenant: &Tenant) -> String {
    let iss = issuer.issuer();
    let subject = crate::kms::issuer::subject(&tenant.id);
    format!(
        "vault auth enable -path=keybroker jwt\n\
         vault write auth/keybroker/config oidc_discovery_url=\"{iss}\" bound_issuer=\"{iss}\"\n\
         # (a Vault that cannot reach {iss}: jwt_validation_pubkeys from `keybroker keyring oidc-keys`)\n\
         vault write auth/keybroker/role/keybroker role_type=jwt user_claim=sub \\\n  \
         bound_subject=\"{subject}\" bound_audiences=\"<VAULT_ADDR>\" \\\n  \
         token_policies=\"<POLICY>\" token_ttl=20m token_max_ttl=1h\n\
         # then LinkKey with vault_jwt {{ mount: \"keybroker\", role: \"keybroker\" }}\n"
    )
}
