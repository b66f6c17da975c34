//! TLS for the gRPC listener: rustls with mandatory client certificates.
//!
//! A caller's identity is read from its certificate during the handshake:
//! the single SPIFFE URI SAN (`spiffe://trust-domain/path`), or else its one
//! DNS SAN. A certificate without an identity, with several URI SANs or from
//! an untrusted SPIFFE trust domain fails the handshake, so such a caller
//! never reaches a handler. The certificate, key and client CA files are
//! re-read when they change: meshes rotate certificates every few hours.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::reload::FileStamp;

/// Where the listener's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain of the server (leaf first).
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that issue client certificates.
    pub client_ca: PathBuf,
    /// SPIFFE trust domains whose IDs are accepted; empty accepts any trust
    /// domain the client CA issues for.
    pub trust_domains: Vec<String>,
    /// How often the three files are checked for changes.
    pub reload_interval: Duration,
}

/// Why a TLS configuration could not be built. Carries paths, never key bytes.
#[derive(Debug, thiserror::Error)]
#[error("TLS {what} {path}: {reason}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    reason: String,
}

/// The caller identity in a client certificate, or why it has none usable.
pub fn certificate_identity(der: &[u8], trust_domains: &[String]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName extension: {e}"))?;
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        match name {
            x509_parser::extensions::GeneralName::URI(uri) => uris.push(*uri),
            x509_parser::extensions::GeneralName::DNSName(host) => dns.push(*host),
            _ => {}
        }
    }
    match (uris.as_slice(), dns.as_slice()) {
        ([uri], _) => spiffe_id(uri, trust_domains),
        ([], [host]) => Ok((*host).to_owned()),
        ([], []) => Err("client certificate has no URI or DNS subjectAltName: no identity".into()),
        ([], hosts) => Err(format!(
            "client certificate has {} DNS SANs and no SPIFFE ID: the identity is ambiguous",
            hosts.len()
        )),
        (uris, _) => Err(format!(
            "client certificate has {} URI SANs; a SPIFFE identity must be exactly one",
            uris.len()
        )),
    }
}

fn spiffe_id(uri: &str, trust_domains: &[String]) -> Result<String, String> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("URI SAN {uri:?} is not a SPIFFE ID (spiffe://...)"))?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_domain = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !valid_domain || path.is_empty() || uri.contains(['?', '#']) {
        return Err(format!("URI SAN {uri:?} is not a valid SPIFFE ID"));
    }
    if !trust_domains.is_empty() && !trust_domains.iter().any(|d| d == domain) {
        return Err(format!(
            "SPIFFE trust domain {domain:?} is not trusted (trusted: {})",
            trust_domains.join(", ")
        ));
    }
    Ok(uri.to_owned())
}

/// Chain validation by webpki, then the identity rules above.
#[derive(Debug)]
struct IdentityVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domains: Vec<String>,
}

impl ClientCertVerifier for IdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        certificate_identity(end_entity, &self.trust_domains).map_err(rustls::Error::General)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads the files and builds a server configuration (TLS 1.2 and 1.3,
/// h2 only, client certificates required).
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let err = |what, path: &PathBuf, reason: String| TlsError {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(&settings.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err("certificate", &settings.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(err(
            "certificate",
            &settings.cert,
            "no PEM certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&settings.key)
        .map_err(|e| err("private key", &settings.key, e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&settings.client_ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err("client CA", &settings.client_ca, e.to_string()))?;
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| err("client CA", &settings.client_ca, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err(
            "client CA",
            &settings.client_ca,
            "no CA certificate".into(),
        ));
    }
    let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| err("client CA", &settings.client_ca, e.to_string()))?;
    let verifier = Arc::new(IdentityVerifier {
        chain,
        trust_domains: settings.trust_domains.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("certificate", &settings.cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| err("certificate/key pair", &settings.cert, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The current server configuration, replaced when the files change.
#[derive(Debug)]
pub struct TlsSource {
    settings: TlsSettings,
    /// Read on every handshake, written on reload: handshakes never wait for
    /// file I/O, they take whichever configuration is current.
    current: RwLock<Arc<ServerConfig>>,
    /// What the files looked like when `current` was built.
    stamp: std::sync::Mutex<FileStamp>,
}

impl TlsSource {
    pub fn load(settings: TlsSettings) -> Result<Arc<Self>, TlsError> {
        let stamp = FileStamp::of(&paths(&settings));
        let current = server_config(&settings)?;
        Ok(Arc::new(Self {
            settings,
            current: RwLock::new(current),
            stamp: std::sync::Mutex::new(stamp),
        }))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(config) => Arc::clone(&config),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Rebuilds the configuration if a file changed. A broken new file keeps
    /// the old configuration serving (logged): a half-written rotation must
    /// not take the listener down.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = FileStamp::of(&paths(&self.settings));
        let Ok(mut seen) = self.stamp.lock() else {
            return false;
        };
        if *seen == stamp {
            return false;
        }
        match server_config(&self.settings) {
            Ok(config) => {
                *seen = stamp;
                match self.current.write() {
                    Ok(mut current) => *current = config,
                    Err(poisoned) => *poisoned.into_inner() = config,
                }
                tracing::info!("TLS certificate, key or client CA changed; reloaded");
                true
            }
            Err(err) => {
                tracing::error!(error = %err, "TLS files changed but cannot be loaded; still serving the previous ones");
                false
            }
        }
    }

    pub fn spawn_reloader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        crate::reload::every(self.settings.reload_interval, self, |source| {
            source.reload_if_changed();
        })
    }

    /// SPIFFE trust domains accepted (empty: any the CA issues for).
    pub fn trust_domains(&self) -> &[String] {
        &self.settings.trust_domains
    }
}

fn paths(settings: &TlsSettings) -> [PathBuf; 3] {
    [
        settings.cert.clone(),
        settings.key.clone(),
        settings.client_ca.clone(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(uris: &[&str], dns: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
        }
        for host in dns {
            params
                .subject_alt_names
                .push(rcgen::SanType::DnsName((*host).try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identities_from_sans() {
        let trusted = vec!["prod.example".to_owned()];
        let id =
            |uris: &[&str], dns: &[&str]| certificate_identity(&cert_with(uris, dns), &trusted);
        assert_eq!(
            id(&["spiffe://prod.example/ns/a/sa/b"], &["ignored.example"]).unwrap(),
            "spiffe://prod.example/ns/a/sa/b"
        );
        assert_eq!(id(&[], &["billing.internal"]).unwrap(), "billing.internal");
        assert!(id(&[], &[]).unwrap_err().contains("no identity"));
        assert!(
            id(&["spiffe://prod.example/a", "spiffe://prod.example/b"], &[])
                .unwrap_err()
                .contains("2 URI SANs")
        );
        assert!(
            id(&["spiffe://other.example/a"], &[])
                .unwrap_err()
                .contains("not trusted")
        );
        assert!(
            id(&["https://prod.example/a"], &[])
                .unwrap_err()
                .contains("not a SPIFFE ID")
        );
        assert!(
            id(&["spiffe://prod.example"], &[])
                .unwrap_err()
                .contains("not a valid SPIFFE ID")
        );
        assert!(
            id(&[], &["a.example", "b.example"])
                .unwrap_err()
                .contains("ambiguous")
        );
        // No trust-domain restriction configured: any domain the CA signs.
        assert!(certificate_identity(&cert_with(&["spiffe://other.example/a"], &[]), &[]).is_ok());
    }
}
