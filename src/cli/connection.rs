//! The connection every client command makes: the server address and TLS
//! material, and the tenant affinity header on every call. A leaf: the
//! commands (client, admin, bulk) use it, it uses none of them.

use std::path::PathBuf;

use tonic::metadata::{Ascii, MetadataKey, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub(super) struct ServerArg {
    /// Server address.
    #[arg(
        long,
        env = "KEYBROKER_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub(super) server: String,
    /// CA certificate (PEM) that issued the server's certificate; makes the
    /// connection TLS (use an https:// --server).
    #[arg(long, env = "KEYBROKER_CLIENT_CA")]
    pub(super) ca: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS: the caller identity.
    #[arg(long, env = "KEYBROKER_CLIENT_CERT", requires = "key")]
    pub(super) cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "KEYBROKER_CLIENT_KEY", requires = "cert")]
    pub(super) key: Option<PathBuf>,
    /// Name to verify in the server certificate [default: the host of --server].
    #[arg(long, env = "KEYBROKER_SERVER_NAME")]
    pub(super) server_name: Option<String>,
    /// Header that carries the tenant on every call, for a ring-hash load
    /// balancer's tenant affinity (the server's `affinity_header`).
    #[arg(long, env = "KEYBROKER_AFFINITY_HEADER", default_value = crate::api::affinity::DEFAULT_HEADER)]
    pub(super) affinity_header: String,
}

/// Sets the affinity header on every call of a client made for one tenant,
/// so a `ring_hash` policy keyed on it never fails closed (docs/fleet.md).
/// A tenant id that is not a valid header value (the server
/// refuses such ids anyway) is sent without the header.
#[derive(Debug, Clone)]
pub(super) struct TenantHeader {
    name: MetadataKey<Ascii>,
    value: Option<MetadataValue<Ascii>>,
}

impl TenantHeader {
    fn new(name: &str, tenant: &str) -> anyhow::Result<Self> {
        let name = crate::api::affinity::header_key(name)
            .map_err(|reason| anyhow::anyhow!("--affinity-header: {reason}"))?;
        let value = (!tenant.is_empty())
            .then(|| MetadataValue::try_from(tenant).ok())
            .flatten();
        Ok(Self { name, value })
    }
}

impl Interceptor for TenantHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert(self.name.clone(), value.clone());
        }
        Ok(request)
    }
}

/// A connection whose calls carry one tenant's affinity header.
pub(super) type TenantChannel = InterceptedService<Channel, TenantHeader>;

/// A connection for calls about `tenant` (`""`: none, e.g. health).
pub(super) async fn channel(server: &ServerArg, tenant: &str) -> anyhow::Result<TenantChannel> {
    let header = TenantHeader::new(&server.affinity_header, tenant)?;
    let mut endpoint = Channel::from_shared(server.server.clone())
        .map_err(|e| anyhow::anyhow!("invalid --server {:?}: {e}", server.server))?;
    if server.ca.is_some() || server.cert.is_some() {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &server.ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&server.cert, &server.key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        if let Some(name) = &server.server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", server.server))?;
    Ok(InterceptedService::new(channel, header))
}
