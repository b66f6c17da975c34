//! The floor: one unary RPC answering 32 bytes from a HashMap, served with
//! the same tonic server and HTTP/2 settings as keybroker (TCP_NODELAY, the
//! default flow-control windows, keybroker's default keepalive, one
//! connection per client) and keybroker's log subscriber; with TLS
//! settings, keybroker's mTLS listener (rustls, the client certificate
//! checked and its identity read) in front.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::pb::floor_server::{Floor, FloorServer};
use crate::pb::{GetRequest, GetResponse};

#[derive(Debug)]
struct FloorService {
    /// Filled on first sight of a key, then read-only in steady state.
    values: std::sync::RwLock<HashMap<Vec<u8>, [u8; 32]>>,
}

#[tonic::async_trait]
impl Floor for FloorService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let req = request.into_inner();
        let found = self
            .values
            .read()
            .map_err(|_| Status::internal("poisoned"))?
            .get(&req.key)
            .copied();
        let value = match found {
            Some(v) => v,
            None => {
                let mut v = [0u8; 32];
                v[..req.key.len().min(32)].copy_from_slice(&req.key[..req.key.len().min(32)]);
                self.values
                    .write()
                    .map_err(|_| Status::internal("poisoned"))?
                    .insert(req.key, v);
                v
            }
        };
        Ok(Response::new(GetResponse {
            value: value.to_vec(),
        }))
    }
}

/// Serves until killed; prints `listening ADDR` once bound.
pub(crate) fn serve(
    listen: SocketAddr,
    tls: keybroker::net::tls::TlsSettings,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // keybroker's own subscriber, so tracing costs the floor what it
        // costs keybroker: without one, every h2 span falls back to the
        // `log` crate (~11,000 instructions per request measured).
        let _telemetry = keybroker::telemetry::init(keybroker::telemetry::LogFormat::Text, None)?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("listening {}", listener.local_addr()?);
        let service = Arc::new(FloorService {
            values: std::sync::RwLock::default(),
        });
        // keybroker's defaults: hyper's keepalive records every frame.
        let connections = keybroker::net::incoming::ConnectionSettings::default();
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(connections.keepalive_interval))
            .http2_keepalive_timeout(Some(connections.keepalive_timeout))
            .add_service(FloorServer::from_arc(service));
        if tls.enabled() {
            let source = keybroker::net::tls::TlsSource::load(tls)?;
            let (incoming, _accepting) =
                keybroker::net::incoming::accept(listener, Some(source), connections);
            server.serve_with_incoming(incoming).await?;
        } else {
            server
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                )
                .await?;
        }
        Ok(())
    })
}
