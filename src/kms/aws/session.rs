//! STS role sessions: the customer's IAM role, assumed with the tenant's
//! external ID, its credentials cached and refreshed ahead of expiry.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, error::CredentialsError, future};

use super::arn::RoleArn;
use super::classify::classify_sts;
use crate::kms::ProviderError;

/// `kb-<tenant>` in STS's session-name charset, so the customer's CloudTrail
/// shows which tenant used their key.
pub fn session_name(tenant_id: &str) -> String {
    let cleaned: String = tenant_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("kb-{cleaned}");
    if name.len() > 64 {
        // Keep it unique: a prefix plus a digest of the full id.
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, tenant_id.as_bytes());
        name = format!("{}-{}", &name[..47], &hex::encode(digest.as_ref())[..16]);
    }
    name
}

/// Assumed-role credentials, refreshed ahead of expiry. The tokio mutex is
/// held across the AssumeRole call on purpose: concurrent callers wait for
/// the one refresh instead of each assuming the role.
pub(super) struct RoleSession {
    pub(super) sts: aws_sdk_sts::Client,
    pub(super) role_arn: RoleArn,
    pub(super) external_id: String,
    pub(super) session_name: String,
    /// Lifetime asked of STS (`aws_session_duration`).
    pub(super) duration: Duration,
    /// The current credentials; see the struct's comment for why a tokio
    /// mutex held across the call.
    pub(super) credentials: tokio::sync::Mutex<Option<Credentials>>,
    /// This session's KMS clients by region (a handful at most). They hold
    /// the session weakly, so dropping the session frees them. A plain lock:
    /// map access only.
    pub(super) clients: parking_lot::Mutex<std::collections::HashMap<String, aws_sdk_kms::Client>>,
    /// AssumeRole calls made, shared by every session (metrics, tests).
    pub(super) calls: Arc<AtomicU64>,
}

impl fmt::Debug for RoleSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoleSession")
            .field("role_arn", &self.role_arn)
            .field("session_name", &self.session_name)
            .finish_non_exhaustive()
    }
}

impl RoleSession {
    /// Refresh when less than this is left (a fifth of the lifetime, at most
    /// five minutes), so no request ever carries expiring credentials.
    fn refresh_margin(&self) -> Duration {
        (self.duration / 5).min(Duration::from_secs(300))
    }

    /// The same customer role, external ID and session name.
    pub(super) fn same_identity(&self, other: &RoleSession) -> bool {
        self.role_arn == other.role_arn
            && self.external_id == other.external_id
            && self.session_name == other.session_name
    }

    pub(super) async fn credentials(&self) -> Result<Credentials, ProviderError> {
        let mut cached = self.credentials.lock().await;
        if let Some(creds) = cached.as_ref() {
            let fresh = creds
                .expiry()
                .is_some_and(|exp| exp > SystemTime::now() + self.refresh_margin());
            if fresh {
                return Ok(creds.clone());
            }
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let out = self
            .sts
            .assume_role()
            .role_arn(self.role_arn.as_str())
            .external_id(&self.external_id)
            .role_session_name(&self.session_name)
            .duration_seconds(i32::try_from(self.duration.as_secs()).unwrap_or(3600))
            .send()
            .await
            .map_err(|e| classify_sts(e, self.role_arn.as_str(), &self.external_id))?;
        let c = out.credentials().ok_or_else(|| {
            ProviderError::Internal("STS AssumeRole returned no credentials".into())
        })?;
        let expiry = SystemTime::try_from(*c.expiration()).map_err(|_| {
            ProviderError::Internal("STS AssumeRole returned an invalid expiration".into())
        })?;
        let creds = Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_owned()),
            Some(expiry),
            "keybroker-assume-role",
        );
        *cached = Some(creds.clone());
        Ok(creds)
    }
}

/// Hands the session's cached credentials to the SDK. Weak: the session
/// owns its clients, and a client must not keep its session alive. Every
/// call goes through a provider that holds the session, so the upgrade
/// fails only for a client used after its session was dropped.
#[derive(Debug)]
pub(super) struct SessionCredentials(pub(super) std::sync::Weak<RoleSession>);

impl ProvideCredentials for SessionCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            let session = self.0.upgrade().ok_or_else(|| {
                CredentialsError::provider_error(ProviderError::Internal(
                    "the customer role session was dropped".into(),
                ))
            })?;
            session
                .credentials()
                .await
                .map_err(CredentialsError::provider_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_fit_sts() {
        assert_eq!(session_name("acme"), "kb-acme");
        assert_eq!(session_name("org:team"), "kb-org-team");
        let long = session_name(&"x".repeat(128));
        assert_eq!(long.len(), 64);
        assert_ne!(long, session_name(&format!("{}y", "x".repeat(127))));
    }
}
