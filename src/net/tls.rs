//! TLS for the gRPC listener: rustls with mandatory client certificates.
//!
//! A caller's identity is read from its certificate during the handshake,
//! typed by where it came from so that kinds never collide: the single
//! SPIFFE URI SAN (`spiffe://trust-domain/path`, validated to the SPIFFE ID
//! spec), or else its one DNS SAN, written `dns:name` (a DNS SAN spelled
//! like a SPIFFE ID is not a valid DNS name and is refused). A certificate
//! without an identity, with several URI SANs, an invalid SPIFFE ID or an
//! untrusted SPIFFE trust domain fails the handshake, so such a caller never
//! reaches a handler. The certificate, key and client CA files are
//! re-read when they change: meshes rotate certificates every few hours.
//!
//! Longer than most files on purpose: identity parsing (SPIFFE, DNS) and the
//! certificate checks it feeds are one trust decision, read and reviewed
//! together; about a third is their unit tests.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::reload::FileStamp;

/// Where the listener's TLS material lives: the `tls_*` settings. All three
/// files (mTLS) or none (plaintext).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TlsSettings {
    /// Server certificate chain (PEM, leaf first). With --tls-key and
    /// --tls-client-ca, serves mTLS: every caller presents a certificate
    /// from that CA.
    #[arg(id = "tls_cert", long = "tls-cert", env = "KEYBROKER_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(id = "tls_key", long = "tls-key", env = "KEYBROKER_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that issue caller certificates.
    #[arg(
        id = "tls_client_ca",
        long = "tls-client-ca",
        env = "KEYBROKER_TLS_CLIENT_CA"
    )]
    pub client_ca: Option<PathBuf>,
    /// SPIFFE trust domain whose IDs are accepted, repeatable [default: any
    /// the client CA issues for].
    #[arg(
        id = "tls_trust_domains",
        long = "tls-trust-domain",
        env = "KEYBROKER_TLS_TRUST_DOMAINS",
        value_delimiter = ','
    )]
    pub trust_domains: Vec<String>,
    /// How often TLS files and the policy are checked for changes.
    #[arg(id = "reload_interval", long = "reload-interval", env = "KEYBROKER_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub reload_interval: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl TlsSettings {
    /// All three files given: the listener serves mTLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some() && self.client_ca.is_some()
    }

    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        let given = [&self.cert, &self.key, &self.client_ca]
            .iter()
            .filter(|f| f.is_some())
            .count();
        if given != 0 && given != 3 {
            return invalid(
                "tls_cert/tls_key/tls_client_ca",
                "give all three (mTLS) or none (plaintext on loopback)",
            );
        }
        if self.reload_interval.is_zero() {
            return invalid("reload_interval", "must be longer than zero");
        }
        Ok(())
    }

    /// The certificate, key and client CA files, or why TLS cannot start.
    fn files(&self) -> Result<[&PathBuf; 3], TlsError> {
        match (&self.cert, &self.key, &self.client_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok([cert, key, ca]),
            _ => Err(TlsError {
                what: "settings",
                path: "tls_cert/tls_key/tls_client_ca".into(),
                reason: "give all three files".into(),
            }),
        }
    }
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
        ([], [host]) => dns_identity(host),
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

/// Prefix of DNS-name identities, in policies and audit records.
pub const DNS_IDENTITY_PREFIX: &str = "dns:";

/// Longest SPIFFE ID (SPIFFE ID spec: URIs up to 2048 bytes).
const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain (SPIFFE ID spec: 255 bytes).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Validates a SPIFFE ID to the SPIFFE ID specification: scheme `spiffe`,
/// a trust domain of lower-case letters, digits, `.`, `-` and `_` (no port,
/// no user info), and a path of non-empty segments of letters, digits,
/// `.`, `-` and `_`, none of them `.` or `..`, with no trailing slash,
/// query, fragment or percent-encoding. Workload identities need a path.
pub fn parse_spiffe_id(uri: &str) -> Result<(&str, &str), String> {
    let invalid = |why: &str| {
        Err(format!(
            "URI SAN {} is not a valid SPIFFE ID: {why}",
            crate::text::Quoted(uri)
        ))
    };
    let Some(rest) = uri.strip_prefix("spiffe://") else {
        return Err(format!(
            "URI SAN {} is not a SPIFFE ID (spiffe://...)",
            crate::text::Quoted(uri)
        ));
    };
    if uri.len() > MAX_SPIFFE_ID_LEN {
        return invalid("longer than 2048 bytes");
    }
    let (domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if domain.is_empty() {
        return invalid("the trust domain is empty");
    }
    if domain.len() > MAX_TRUST_DOMAIN_LEN {
        return invalid("the trust domain is longer than 255 bytes");
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return invalid(
            "the trust domain may only hold lower-case letters, digits, '.', '-' and '_'",
        );
    }
    if path.is_empty() {
        return invalid("no path: a workload's SPIFFE ID names it below the trust domain");
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return invalid("empty path segment (\"//\" or a trailing '/')");
        }
        if segment == "." || segment == ".." {
            return invalid("'.' and '..' path segments are not allowed");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return invalid(
                "path segments may only hold letters, digits, '.', '-' and '_' (no query, fragment or percent-encoding)",
            );
        }
    }
    Ok((domain, path))
}

fn spiffe_id(uri: &str, trust_domains: &[String]) -> Result<String, String> {
    let (domain, _) = parse_spiffe_id(uri)?;
    if !trust_domains.is_empty() && !trust_domains.iter().any(|d| d == domain) {
        return Err(format!(
            "SPIFFE trust domain {domain:?} is not trusted (trusted: {})",
            trust_domains.join(", ")
        ));
    }
    Ok(uri.to_owned())
}

/// A DNS SAN as an identity, `dns:` + the name in lower case. The name must
/// be a valid DNS name (RFC 1123 labels: letters, digits and `-`, 1 to 63
/// bytes each, 253 in all; no wildcard), so nothing spelled like another
/// kind of identity passes.
pub fn dns_identity(host: &str) -> Result<String, String> {
    let invalid = |why: &str| {
        Err(format!(
            "DNS SAN {} is not a valid DNS name: {why}",
            crate::text::Quoted(host)
        ))
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return invalid("it must be 1 to 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return invalid("every label must be 1 to 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return invalid("labels hold letters, digits and inner '-' only (no wildcard)");
        }
    }
    Ok(format!(
        "{DNS_IDENTITY_PREFIX}{}",
        name.to_ascii_lowercase()
    ))
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
    let [cert, key, client_ca] = settings.files()?;
    let err = |what, path: &PathBuf, reason: String| TlsError {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err("certificate", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(err("certificate", cert, "no PEM certificate".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| err("private key", key, e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(client_ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err("client CA", client_ca, e.to_string()))?;
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| err("client CA", client_ca, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("client CA", client_ca, "no CA certificate".into()));
    }
    let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| err("client CA", client_ca, e.to_string()))?;
    let verifier = Arc::new(IdentityVerifier {
        chain,
        trust_domains: settings.trust_domains.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("certificate", cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| err("certificate/key pair", cert, e.to_string()))?;
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
    /// What the files looked like when `current` was built, and when a
    /// reload last failed (so a broken file is reported once per change,
    /// not on every tick).
    stamp: Mutex<(FileStamp, Option<FileStamp>)>,
    /// Broken reloads reported (one per change of the files).
    failures: std::sync::atomic::AtomicU64,
}

impl TlsSource {
    pub fn load(settings: TlsSettings) -> Result<Arc<Self>, TlsError> {
        let stamp = FileStamp::of(&paths(&settings));
        let current = server_config(&settings)?;
        Ok(Arc::new(Self {
            settings,
            current: RwLock::new(current),
            stamp: Mutex::new((stamp, None)),
            failures: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read())
    }

    /// Rebuilds the configuration if a file changed. A broken new file keeps
    /// the old configuration serving (logged): a half-written rotation must
    /// not take the listener down.
    pub fn reload_if_changed(&self) -> bool {
        let stamp = FileStamp::of(&paths(&self.settings));
        let mut seen = self.stamp.lock();
        if seen.0 == stamp || seen.1.as_ref() == Some(&stamp) {
            return false;
        }
        match server_config(&self.settings) {
            Ok(config) => {
                *seen = (stamp, None);
                *self.current.write() = config;
                tracing::info!("TLS certificate, key or client CA changed; reloaded");
                true
            }
            Err(err) => {
                seen.1 = Some(stamp);
                self.failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %err, "TLS files changed but cannot be loaded; still serving the previous ones (logged once per change)");
                false
            }
        }
    }

    /// Broken reloads reported so far: one per change of the files, however
    /// many reload ticks pass while they stay broken.
    pub fn reload_failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn reloader(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
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
    settings
        .files()
        .map_or_else(|_| Default::default(), |files| files.map(PathBuf::clone))
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
