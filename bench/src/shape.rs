//! The shapes `load`, `peer` and `profile` measure in. `plaintext`: one
//! tenant over plaintext HTTP/2 on loopback, no policy, no audit sink — the
//! service's own cost and nothing else. `production`: what a platform runs —
//! mTLS on every server (one CA issues the servers' and the callers'
//! certificates; the callers carry SPIFFE IDs), keybroker with an
//! authorization policy and its audit log written to a file, fail-closed,
//! and 100 tenants whose keys the load interleaves.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::servers::ServerProcess;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Shape {
    Plaintext,
    Production,
}

impl Shape {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Production => "production",
        }
    }

    /// Tenants of the shape unless `--tenants` says otherwise.
    fn default_tenants(self) -> usize {
        match self {
            Self::Plaintext => 1,
            Self::Production => 100,
        }
    }
}

/// Who calls: the platform service driving the load, or the operator
/// reading the access log (the policy grants each only its own methods).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Caller {
    Service,
    Operator,
}

const SERVICE_ID: &str = "spiffe://bench.example/ns/storage/sa/load";
const OPERATOR_ID: &str = "spiffe://bench.example/ops/bench";

/// The policy of the production shape: the service may use every bench
/// tenant's keys with the reasons a storage service claims, the operator
/// may read the access log and nothing else.
const POLICY: &str = r#"
[[allow]]
description = "the load: a storage service using every bench tenant's keys"
identities = ["spiffe://bench.example/ns/storage/sa/load"]
methods = ["keybroker.v1.KeyBroker/GenerateDataKey", "keybroker.v1.KeyBroker/UnwrapKey",
           "keybroker.v1.KeyBroker/BatchUnwrapKey"]
tenants = ["bench-*"]
reasons = ["none", "customer_initiated", "platform_operation"]

[[allow]]
description = "the operator checking the key access log"
identities = ["spiffe://bench.example/ops/*"]
methods = ["keybroker.v1.KeyAdmin/ListKeyAccess"]
tenants = ["*"]
"#;

/// A certificate and its key, in PEM.
struct Pem {
    cert: String,
    key: String,
}

/// The files and credentials of one shape, in a directory of the run.
pub(crate) struct Deployment {
    pub(crate) shape: Shape,
    pub(crate) tenants: Vec<Arc<str>>,
    dir: PathBuf,
    /// CA, service and operator certificates (production only).
    pki: Option<Pki>,
}

struct Pki {
    ca: String,
    service: Pem,
    operator: Pem,
}

impl Deployment {
    /// Writes the shape's files into `dir`: for production, a CA, the
    /// servers' certificate (localhost, 127.0.0.1), the callers' and the
    /// policy. `tenants`: the shape's default when not given.
    pub(crate) fn new(shape: Shape, dir: &Path, tenants: Option<usize>) -> anyhow::Result<Self> {
        let tenants = tenants.unwrap_or(shape.default_tenants());
        anyhow::ensure!(tenants >= 1, "tenants must be at least 1");
        let tenants = match shape {
            Shape::Plaintext if tenants == 1 => vec!["bench".into()],
            _ => (0..tenants)
                .map(|t| Arc::from(format!("bench-{t:03}")))
                .collect(),
        };
        let pki = match shape {
            Shape::Plaintext => None,
            Shape::Production => {
                let ca = Ca::new()?;
                let server = ca.issue(&[
                    SanType::DnsName("localhost".try_into()?),
                    SanType::IpAddress([127, 0, 0, 1].into()),
                ])?;
                let write = |name: &str, text: &str| std::fs::write(dir.join(name), text);
                write("ca.crt", &ca.issuer.pem())?;
                write("server.crt", &server.cert)?;
                write("server.key", &server.key)?;
                write("policy.toml", POLICY)?;
                Some(Pki {
                    ca: ca.issuer.pem(),
                    service: ca.issue(&[SanType::URI(SERVICE_ID.try_into()?)])?,
                    operator: ca.issue(&[SanType::URI(OPERATOR_ID.try_into()?)])?,
                })
            }
        };
        Ok(Self {
            shape,
            tenants,
            dir: dir.to_owned(),
            pki,
        })
    }

    /// keybroker in this shape, its data in the shape's directory, pinned
    /// to `pin` and run under `wrapper` (valgrind) when given.
    pub(crate) fn spawn_keybroker(
        &self,
        bin: &Path,
        pin: Option<usize>,
        wrapper: &[String],
    ) -> anyhow::Result<ServerProcess> {
        crate::servers::spawn_keybroker(bin, &self.dir, pin, wrapper, &self.keybroker_args())
    }

    /// The floor in this shape.
    pub(crate) fn spawn_floor(
        &self,
        pin: Option<usize>,
        wrapper: &[String],
    ) -> anyhow::Result<ServerProcess> {
        crate::servers::spawn_floor(pin, wrapper, &self.tls_args())
    }

    /// The server's TLS flags (keybroker's and the floor's are the same).
    fn tls_args(&self) -> Vec<OsString> {
        if self.pki.is_none() {
            return Vec::new();
        }
        let file = |flag: &str, name: &str| [OsString::from(flag), self.dir.join(name).into()];
        [
            file("--tls-cert", "server.crt"),
            file("--tls-key", "server.key"),
            file("--tls-client-ca", "ca.crt"),
        ]
        .concat()
    }

    /// keybroker's flags beyond the plaintext defaults: TLS, the policy, and
    /// the audit log in a file, a call refused when its record cannot be
    /// written.
    fn keybroker_args(&self) -> Vec<OsString> {
        let mut args = self.tls_args();
        if self.pki.is_some() {
            args.extend([
                "--authz-policy".into(),
                self.dir.join("policy.toml").into(),
                "--audit-log".into(),
                self.dir.join("audit.log").into(),
                "--audit-fail-closed".into(),
                // Rotated files are kept (not the default 5), so the run
                // can count every record written.
                "--audit-max-files".into(),
                "100000".into(),
            ]);
        }
        args
    }

    /// A connection to the server at `addr` (one HTTP/2 connection), as
    /// `caller`.
    pub(crate) async fn channel(&self, addr: &str, caller: Caller) -> anyhow::Result<Channel> {
        let Some(pki) = &self.pki else {
            return Ok(Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?);
        };
        let pem = match caller {
            Caller::Service => &pki.service,
            Caller::Operator => &pki.operator,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .identity(Identity::from_pem(&pem.cert, &pem.key))
            .domain_name("localhost");
        Channel::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await
            .with_context(|| format!("mTLS connection to {addr}"))
    }

    /// OpenBao's extra configuration in production: a listener on `port`
    /// with TLS and a client certificate required from the same CA, as
    /// keybroker's, and a file audit device (OpenBao declares audit devices
    /// in its configuration only).
    pub(crate) fn bao_config(&self, port: u16) -> Option<String> {
        self.pki.as_ref()?;
        let path = |name: &str| self.dir.join(name).display().to_string();
        Some(format!(
            r#"listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_cert_file = "{}"
  tls_key_file = "{}"
  tls_client_ca_file = "{}"
  tls_require_and_verify_client_cert = true
}}
audit "file" "bench" {{
  options {{
    file_path = "{}"
  }}
}}
"#,
            path("server.crt"),
            path("server.key"),
            path("ca.crt"),
            path("bao-audit.log"),
        ))
    }

    /// The HTTP/1.1 client of OpenBao calls: in production with the
    /// service's certificate and the CA.
    pub(crate) fn http_client(&self) -> anyhow::Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder();
        if let Some(pki) = &self.pki {
            builder = builder
                .tls_certs_only([reqwest::Certificate::from_pem(pki.ca.as_bytes())?])
                .identity(reqwest::Identity::from_pem(
                    format!("{}{}", pki.service.cert, pki.service.key).as_bytes(),
                )?);
        }
        Ok(builder.build()?)
    }
}

/// The run's certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> anyhow::Result<Self> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "keybroker-bench CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
        })
    }

    fn issue(&self, sans: &[SanType]) -> anyhow::Result<Pem> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans.to_vec();
        params
            .distinguished_name
            .push(DnType::CommonName, "keybroker-bench");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}
