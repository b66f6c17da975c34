//! Accepted connections, plaintext or TLS, each tagged with who is on the
//! other end. Handshakes run in their own tasks, so a slow or hostile client
//! cannot hold up accepting others.
//!
//! Connections that say nothing must not exhaust the server: at most
//! `max_connections` are open at once (more are closed as soon as they are
//! accepted, so the process never runs out of file descriptors); each must
//! finish its TLS handshake and send the HTTP/2 preface within
//! `handshake_timeout`; and one with no RPC in flight for `idle_timeout` is
//! closed. HTTP/2 keepalive pings (configured on the tonic server) close
//! connections whose peer vanished.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::net::tls::TlsSource;

/// The client connection preface of HTTP/2 (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// File descriptors kept free for everything but client connections
/// (registry, KMS and STS connections, the audit and keyring files).
const RESERVED_FDS: u64 = 128;

/// Limits on client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct ConnectionSettings {
    /// A client must finish its TLS handshake and send the HTTP/2 preface
    /// within this.
    #[arg(id = "handshake_timeout", long = "handshake-timeout", env = "KEYBROKER_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// Send an HTTP/2 PING after this long without frames.
    #[arg(id = "keepalive_interval", long = "keepalive-interval", env = "KEYBROKER_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration, default_value = "60s")]
    pub keepalive_interval: Duration,
    /// Close the connection when a PING is unanswered this long.
    #[arg(id = "keepalive_timeout", long = "keepalive-timeout", env = "KEYBROKER_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20s")]
    pub keepalive_timeout: Duration,
    /// Close a connection with no RPC in flight for this long.
    #[arg(id = "idle_timeout", long = "idle-timeout", env = "KEYBROKER_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10m")]
    pub idle_timeout: Duration,
    /// Client connections open at once, further ones are closed at accept;
    /// also capped by the file descriptor limit minus 128.
    #[arg(
        id = "max_connections",
        long = "max-connections",
        env = "KEYBROKER_MAX_CONNECTIONS",
        default_value = "10000"
    )]
    pub max_connections: usize,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl ConnectionSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        if self.handshake_timeout.is_zero()
            || self.keepalive_interval.is_zero()
            || self.keepalive_timeout.is_zero()
            || self.idle_timeout.is_zero()
        {
            return crate::settings::invalid(
                "handshake_timeout/keepalive_interval/keepalive_timeout/idle_timeout",
                "must be longer than zero",
            );
        }
        if self.max_connections == 0 {
            return crate::settings::invalid("max_connections", "must be at least 1");
        }
        Ok(())
    }

    /// `max_connections`, lowered so that connections alone can never use
    /// up the file descriptor limit (`RLIMIT_NOFILE`).
    pub fn effective_max_connections(&self) -> usize {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let by_fds =
            usize::try_from(limit.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX);
        self.max_connections.min(by_fds).max(1)
    }
}

/// RPCs in flight on one connection and when the last one ended, shared by
/// the connection (which closes itself when idle) and the layer that sees
/// every request (`api::auth`).
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last RPC's end (0: none yet).
    last_ms: AtomicU64,
    /// tokio's clock (std's outside tests), so the idle logic is tested on
    /// paused time.
    epoch: tokio::time::Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Marks an RPC in flight until the guard is dropped. No clock read: a
    /// connection with an RPC in flight is never idle, and the RPC's end
    /// records the time.
    pub fn begin(self: &Arc<Self>) -> ActiveRpc {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        ActiveRpc(Arc::clone(self))
    }

    /// When the connection becomes idle-closable, or `None` while RPCs run.
    fn idle_deadline(&self, idle: Duration) -> Option<tokio::time::Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.epoch + last + idle)
    }
}

/// One RPC in flight on a connection.
#[derive(Debug)]
pub struct ActiveRpc(Arc<Activity>);

impl Drop for ActiveRpc {
    fn drop(&mut self) {
        self.0.last_ms.fetch_max(self.0.now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Who is connected; tonic puts it in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// SPIFFE ID or DNS name from the verified client certificate; `None` on
    /// a plaintext connection.
    pub identity: Option<Arc<str>>,
    /// RPCs in flight on this connection (for its idle timeout).
    pub activity: Arc<Activity>,
}

#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection.
#[derive(Debug)]
pub struct PeerStream {
    transport: Transport,
    info: PeerInfo,
    /// The HTTP/2 preface, read to prove the peer speaks, replayed to hyper.
    preface_left: usize,
    idle: IdleTimer,
    /// This connection's slot under `max_connections`; freed on drop.
    _slot: OwnedSemaphorePermit,
}

/// Tells a connection when it has had no RPC in flight for `timeout`.
#[derive(Debug)]
struct IdleTimer {
    timeout: Duration,
    /// Wakes the reader to check for idleness.
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// True when `activity` shows no RPC in flight for the timeout. The
    /// timer is only re-armed once it fires (then for the idle deadline the
    /// activity gives, or a full timeout later while RPCs run): a busy
    /// connection's reads cost no clock read.
    fn expired(&mut self, activity: &Activity, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            let deadline = match activity.idle_deadline(self.timeout) {
                Some(deadline) if deadline <= now => return true,
                Some(deadline) => deadline,
                None => now + self.timeout,
            };
            self.sleep.as_mut().reset(deadline);
        }
        false
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.preface_left > 0 {
            let start = H2_PREFACE.len() - this.preface_left;
            let n = this.preface_left.min(buf.remaining());
            buf.put_slice(&H2_PREFACE[start..start + n]);
            this.preface_left -= n;
            return Poll::Ready(Ok(()));
        }
        let read = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if read.is_pending() && this.idle.expired(&this.info.activity, cx) {
            // End of stream: hyper closes the connection. Only ever with no
            // RPC in flight, so no answer is cut short.
            tracing::debug!(peer = ?this.info.remote_addr, "closing an idle connection");
            return Poll::Ready(Ok(()));
        }
        read
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connections accepted on `listener`, TLS-terminated when `tls` is given.
/// The accept task ends when the returned stream is dropped (at shutdown)
/// and the next connection arrives, or when the handle is aborted.
pub fn accept(
    listener: TcpListener,
    tls: Option<Arc<TlsSource>>,
    settings: ConnectionSettings,
) -> (
    tokio_stream::wrappers::ReceiverStream<io::Result<PeerStream>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let max = settings.effective_max_connections();
    tracing::info!(max_connections = max, "client connection limit");
    let slots = Arc::new(Semaphore::new(max));
    let task = tokio::spawn(async move {
        // When the last "too many connections" warning was logged.
        let mut warned: Option<Instant> = None;
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off, retry.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                // Closed at once: its descriptor is free again right away.
                drop(tcp);
                if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warned = Some(Instant::now());
                    tracing::warn!(max_connections = max, peer = %remote, "connection limit reached; closing new connections until some end");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls
                .as_ref()
                .map(|t| (tokio_rustls::TlsAcceptor::from(t.current()), Arc::clone(t)));
            let tx = tx.clone();
            tokio::spawn(async move {
                let opened =
                    tokio::time::timeout(settings.handshake_timeout, open(acceptor, tcp, remote))
                        .await
                        .unwrap_or_else(|_| {
                            Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "no TLS handshake and HTTP/2 preface within the handshake timeout",
                            ))
                        });
                match opened {
                    Ok((transport, info)) => {
                        let stream = PeerStream {
                            transport,
                            info,
                            preface_left: H2_PREFACE.len(),
                            idle: IdleTimer::new(settings.idle_timeout),
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Err(err) => {
                        tracing::info!(peer = %remote, error = %err, "connection refused");
                    }
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

/// The TLS handshake (when TLS is on), then the HTTP/2 client preface.
async fn open(
    tls: Option<(tokio_rustls::TlsAcceptor, Arc<TlsSource>)>,
    tcp: TcpStream,
    remote: SocketAddr,
) -> io::Result<(Transport, PeerInfo)> {
    let (mut transport, identity) = match tls {
        None => (Transport::Plain(tcp), None),
        Some((acceptor, source)) => {
            let (stream, identity) = handshake(acceptor, tcp, source.trust_domains()).await?;
            (Transport::Tls(Box::new(stream)), Some(identity))
        }
    };
    let mut preface = [0u8; 24];
    match &mut transport {
        Transport::Plain(s) => s.read_exact(&mut preface).await?,
        Transport::Tls(s) => s.read_exact(&mut preface).await?,
    };
    if &preface != H2_PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 client (keybroker serves gRPC over HTTP/2 only)",
        ));
    }
    Ok((
        transport,
        PeerInfo {
            remote_addr: Some(remote),
            identity,
            activity: Arc::new(Activity::new()),
        },
    ))
}

async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    trust_domains: &[String],
) -> io::Result<(TlsStream<TcpStream>, Arc<str>)> {
    let stream = acceptor.accept(tcp).await?;
    // The verifier already accepted this certificate and its identity; read
    // the identity again from the verified leaf.
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or_else(|| io::Error::new(io::ErrorKind::PermissionDenied, "no client certificate"))?;
    let identity = crate::net::tls::certificate_identity(leaf, trust_domains)
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
    Ok((stream, identity.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn expired(timer: &mut IdleTimer, activity: &Activity) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(timer.expired(activity, cx))).await
    }

    async fn at(start: tokio::time::Instant, secs: u64) {
        tokio::time::sleep_until(start + Duration::from_secs(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_a_full_timeout_after_its_last_rpc_ends() {
        let start = tokio::time::Instant::now();
        let activity = Arc::new(Activity::new());
        let mut timer = IdleTimer::new(Duration::from_secs(3));
        assert!(!expired(&mut timer, &activity).await);

        // An RPC from 1 s to 5 s: the timer fires at 3 s mid-call and at
        // 6 s, one second after it ended; neither closes the connection.
        at(start, 1).await;
        let rpc = activity.begin();
        at(start, 3).await;
        assert!(!expired(&mut timer, &activity).await, "an RPC is in flight");
        at(start, 5).await;
        drop(rpc);
        at(start, 6).await;
        assert!(!expired(&mut timer, &activity).await, "idle for 1 s only");
        at(start, 7).await;
        assert!(!expired(&mut timer, &activity).await, "idle for 2 s only");
        // Three seconds after the RPC's end.
        at(start, 8).await;
        assert!(expired(&mut timer, &activity).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_calls_is_idle_after_one_timeout() {
        let start = tokio::time::Instant::now();
        let activity = Activity::new();
        let mut timer = IdleTimer::new(Duration::from_secs(3));
        at(start, 2).await;
        assert!(!expired(&mut timer, &activity).await);
        at(start, 3).await;
        assert!(expired(&mut timer, &activity).await);
    }
}
