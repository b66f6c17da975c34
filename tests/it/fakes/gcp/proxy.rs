//! A stand-in for the internet between keybroker and Google's APIs.

use super::*;

use crate::fakes::tunnel::Tunnel;

/// The host whose tunnels the proxy accepts.
pub(crate) const IAM_CREDENTIALS_HOST: &str = "iamcredentials.googleapis.com";

/// Stands in for the internet between keybroker and
/// `iamcredentials.googleapis.com`: an HTTPS proxy (`HTTPS_PROXY`) whose
/// CONNECT tunnels end at the fake, over TLS with a certificate for that
/// host from a test CA. A child process that trusts only that CA
/// (`SSL_CERT_FILE`) runs Google's real impersonation code unchanged.
pub(crate) struct GoogleApisProxy;

impl GoogleApisProxy {
    pub(crate) async fn start(fake: &FakeCloudKms) -> Tunnel {
        Tunnel::start("fake Google CA", &[IAM_CREDENTIALS_HOST], fake.router()).await
    }
}
