//! A stand-in for the internet between keybroker and a cloud's real host
//! names: an HTTPS proxy whose CONNECT tunnels (to allowed hosts only) end
//! at a fake's router, over TLS with certificates for those names from a
//! test CA. A client that trusts the CA and uses the proxy runs the
//! vendor's real code against the real host names, unchanged.

use std::net::SocketAddr;
use std::sync::Arc;

/// A running proxy; its tasks stop when it is dropped.
#[derive(Debug)]
pub(crate) struct Tunnel {
    /// `http://127.0.0.1:PORT`, for `HTTPS_PROXY` or a client's proxy.
    pub(crate) url: String,
    /// The test CA (PEM) that issued the hosts' certificate.
    pub(crate) ca_pem: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Whether `host` is one of `names` (a `*.` name covers one label).
fn allowed(host: &str, names: &[&str]) -> bool {
    names.iter().any(|name| match name.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .and_then(|h| h.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => host == *name,
    })
}

impl Tunnel {
    /// Serves `app` for tunnels to `names` (port 443 only).
    pub(crate) async fn start(ca_name: &str, names: &[&str], app: axum::Router) -> Self {
        use rustls_pki_types::pem::PemObject;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ca = crate::security::Ca::new(ca_name);
        let sans: Vec<rcgen::SanType> = names
            .iter()
            .map(|n| rcgen::SanType::DnsName((*n).try_into().unwrap()))
            .collect();
        let pem = ca.issue(&sans, false);
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(pem.cert.as_bytes())
            .map(|c| c.unwrap())
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let serving = tokio::spawn(async move {
            let _ = axum::serve(Tunnels(rx, addr), app).await;
        });
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let names = names.clone();
                tokio::spawn(async move {
                    // The CONNECT request head, byte by byte up to the blank line.
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if tcp.read_exact(&mut byte).await.is_err() || head.len() > 8192 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head);
                    let target = head
                        .strip_prefix("CONNECT ")
                        .and_then(|rest| rest.split(' ').next())
                        .and_then(|t| t.strip_suffix(":443"))
                        .map(str::to_ascii_lowercase);
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    if !target.is_some_and(|host| allowed(&host, &names)) {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                    if tcp
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = tx.send(tls).await;
                    }
                });
            }
        });
        Self {
            url: format!("http://{addr}"),
            ca_pem: ca.pem(),
            tasks: vec![serving, accepting],
        }
    }
}

/// TLS streams out of CONNECT tunnels, as an axum listener.
struct Tunnels(
    tokio::sync::mpsc::Receiver<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    SocketAddr,
);

impl axum::serve::Listener for Tunnels {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.recv().await {
            Some(io) => (io, self.1),
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.1)
    }
}

#[test]
fn tunnel_hosts() {
    let names = ["login.microsoftonline.com", "*.vault.azure.net"];
    assert!(allowed("login.microsoftonline.com", &names));
    assert!(allowed("contoso.vault.azure.net", &names));
    for bad in [
        "vault.azure.net",
        "a.b.vault.azure.net",
        "evil.com",
        "xvault.azure.net",
    ] {
        assert!(!allowed(bad, &names), "{bad}");
    }
}
