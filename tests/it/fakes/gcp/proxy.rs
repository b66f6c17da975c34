//! A stand-in for the internet between keybroker and Google's APIs.

use super::*;

use std::sync::Arc;

/// Stands in for the internet between keybroker and
/// `iamcredentials.googleapis.com`: an HTTPS proxy (`HTTPS_PROXY`) whose
/// CONNECT tunnels end at the fake, over TLS with a certificate for that
/// host from a test CA. A child process that trusts only that CA
/// (`SSL_CERT_FILE`) runs Google's real impersonation code unchanged.
#[derive(Debug)]
pub(crate) struct GoogleApisProxy {
    pub(crate) url: String,
    pub(crate) ca_pem: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for GoogleApisProxy {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// The host whose tunnels the proxy accepts.
pub(crate) const IAM_CREDENTIALS_HOST: &str = "iamcredentials.googleapis.com";

impl GoogleApisProxy {
    pub(crate) async fn start(fake: &FakeCloudKms) -> Self {
        use rustls_pki_types::pem::PemObject;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ca = crate::security::Ca::new("fake Google CA");
        let pem = ca.issue(
            &[rcgen::SanType::DnsName(
                IAM_CREDENTIALS_HOST.try_into().unwrap(),
            )],
            false,
        );
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(pem.cert.as_bytes())
            .map(|c| c.unwrap())
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let serving = tokio::spawn({
            let app = fake.router();
            async move {
                let _ = axum::serve(Tunnels(rx, addr), app).await;
            }
        });
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
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
                    if !head.starts_with(&format!("CONNECT {IAM_CREDENTIALS_HOST}:443 ")) {
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
