//! Builds the service from a [`Config`] and serves it on a listener until a
//! shutdown future resolves. Tests bind 127.0.0.1:0 and call [`Server::run`].
//!
//! One job past 600 lines: assembling the parts in the order they depend on
//! each other (registry, keyrings, providers, caches, background tasks,
//! listeners) and taking them down in reverse; each part is built in its
//! own module.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::api::Observers;
use crate::api::auth::AuthLayer;
use crate::api::dispatch::DataPlaneLayer;
use crate::api::key_admin::KeyAdminApi;
use crate::api::key_broker::KeyBrokerApi;
use crate::audit::AuditLog;
use crate::authz::{Policy, PolicySource};
use crate::broker::Broker;
use crate::cache::DekCache;
use crate::config::{Config, MAX_MESSAGE_BYTES};
use crate::control::Admin;
use crate::control::rotation::PlatformRotation;
use crate::control::watcher::Watcher;
use crate::keys::{Binding, KeyDirectory, PLATFORM_BINDING};
use crate::kms::aws::AwsKms;
use crate::kms::gcp::GcpKms;
use crate::kms::local::LocalKeyring;
use crate::lifecycle::{Lifecycle, Shredder};
use crate::metrics::Metrics;
use crate::net::tls::TlsSource;
use crate::proto;
use crate::proto::key_admin_server::KeyAdminServer;
use crate::proto::key_broker_server::KeyBrokerServer;
use crate::registry::directory::RegistryDirectory;
use crate::registry::sql::SqlRegistry;

/// Connections the health-only port holds at once: kubelet probes need a
/// few, never thousands.
const HEALTH_MAX_CONNECTIONS: usize = 256;

/// The gRPC health service name that reports the registry: NOT_SERVING
/// while tenants are served from views as last read.
pub const REGISTRY_HEALTH: &str = "keybroker.Registry";

/// A built, not yet serving, keybroker.
#[derive(Debug)]
pub struct Server {
    config: Config,
    broker: Arc<Broker>,
    /// Who may call what; re-read from its file when it changes.
    policy: Arc<PolicySource>,
    audit: Arc<AuditLog>,
    /// The tenants' key access log (kept only with a registry).
    access_log: Arc<crate::access_log::AccessLog>,
    metrics: Arc<Metrics>,
    /// The listener's certificate and client CA, when serving mTLS.
    tls: Option<Arc<TlsSource>>,
    /// The control plane; absent when tests inject their own key directory.
    admin: Option<Arc<Admin>>,
    watcher: Option<Arc<Watcher>>,
    /// Automatic platform keyring rotation (absent with an injected
    /// directory).
    rotation: Option<Arc<PlatformRotation>>,
    /// A plaintext listener serving only `grpc.health.v1` (kubelet's gRPC
    /// probes speak no TLS); never key material.
    health_listener: Option<TcpListener>,
    /// Mints customers' Vault login tokens; its keys are published on the
    /// metrics listener.
    issuer: Option<Arc<crate::kms::issuer::Issuer>>,
    /// The registry-backed directory, whose outage health reports (absent
    /// with an injected directory).
    registry: Option<Arc<RegistryDirectory>>,
    /// Background tasks that live as long as the server (keyring reload,
    /// the watcher, the change listener...).
    tasks: Background,
}

impl Server {
    /// The platform keyring file in the data dir (created on first start)
    /// and the registry (SQLite in the data dir, or PostgreSQL).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with(config, None).await
    }

    /// [`build`](Self::build) with the platform's AWS identity given instead
    /// of read from the standard chain (tests use static credentials, so no
    /// test ever probes an instance metadata endpoint).
    pub async fn build_with(
        config: Config,
        aws_base: Option<aws_config::SdkConfig>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let path = config.platform_keyring_path();
        let hsm = crate::kms::pkcs11::Pkcs11Hsm::from_settings(&config.pkcs11)
            .with_context(|| "setting up the PKCS#11 module")?
            .map(|h| Arc::new(h.with_platform_key(config.server.platform_key.clone())));
        let seal =
            crate::kms::pkcs11::platform_seal(hsm.as_ref(), config.server.platform_key.as_deref())
                .with_context(|| "the platform key (platform_key)")?;
        let keyring = Arc::new(
            LocalKeyring::open_or_create_sealed(PLATFORM_BINDING, &path, seal)
                .with_context(|| "loading the platform keyring")?,
        );
        keyring.set_legacy_wraps(config.server.legacy_local_wraps);
        let reloader = keyring.reloader(config.server.keyring_reload_interval);
        let issuer = crate::kms::issuer::Issuer::from_settings(&config.oidc, Arc::clone(&keyring))
            .map(Arc::new);
        let platform = Arc::new(platform_binding(
            Arc::clone(&keyring),
            &path.display().to_string(),
        ));
        let registry = match &config.registry.url {
            Some(url) => SqlRegistry::connect_with(url.expose(), &config.registry).await,
            None => SqlRegistry::open_sqlite(&config.server.data_dir.join("registry.db")).await,
        }
        .with_context(|| "opening the key registry")?;
        let mut listener_task = None;
        let cache = DekCache::new(config.cache);
        let aws = Arc::new(match aws_base {
            Some(base) => AwsKms::new(base, config.aws.clone()),
            None => AwsKms::from_env(config.aws.clone()).await,
        });
        let assume_role_calls = Arc::clone(&aws.assume_role_calls);
        let directory = Arc::new(
            RegistryDirectory::new(
                Arc::new(registry),
                platform,
                keyring,
                aws,
                Arc::new(GcpKms::new(config.gcp.clone())),
                cache.clone(),
                config.registry.views(),
            )
            .with_vault(Arc::new(
                crate::kms::vault::VaultTransit::new(config.vault.clone())
                    .with_context(|| "setting up the Vault client")?
                    .with_issuer(issuer.clone()),
            ))
            .with_pkcs11(hsm)
            .with_azure(Arc::new(
                crate::kms::azure::AzureKeyVault::new(config.azure.clone())
                    .with_context(|| "setting up the Azure Key Vault client")?,
            ))
            .with_recheck_interval(config.watcher.recheck_interval)
            .with_legacy_wraps(config.server.legacy_local_wraps),
        );
        let flusher = directory.usage_flusher(config.registry.usage_flush_interval);
        let rotation = Arc::new(PlatformRotation::new(
            Arc::clone(&directory),
            path.clone(),
            config.server.platform_keyring_rotation_period,
        ));
        let rotating = rotation.run(config.server.keyring_reload_interval);
        if let Some(url) = config
            .registry
            .url
            .as_ref()
            .filter(|u| u.expose().starts_with("postgres"))
        {
            listener_task = Some(directory.change_listener(url.expose().to_owned()));
        }
        let watcher = Arc::new(Watcher::new(Arc::clone(&directory), config.watcher));
        let watching = watcher.run();
        let lifecycle = Arc::new(Lifecycle::new(Arc::clone(&directory)));
        let maintaining = Shredder::run(&lifecycle, config.deletion.maintenance_interval);
        let access_log = Arc::new(crate::access_log::AccessLog::new(Some(Arc::clone(
            directory.registry(),
        )
            as Arc<dyn crate::registry::access_log::AccessStore>)));
        let logging = access_log.run(config.access_log);
        let mut server = Self::assemble(
            config,
            Arc::clone(&lifecycle) as _,
            cache.clone(),
            access_log,
        )?;
        server.metrics.set_sources(crate::metrics::Sources {
            cache: Some(Arc::new(cache)),
            assume_role_calls: Some(assume_role_calls),
            audit: Some(Arc::clone(&server.audit) as _),
            key_states: Some(Arc::clone(&watcher) as Arc<dyn crate::metrics::KeyStateSource>),
            identities: Some(Arc::clone(&directory) as Arc<dyn crate::metrics::IdentitySource>),
            platform_keyring: Some(Arc::clone(directory.platform_keyring()) as _),
            registry: Some(Arc::clone(&directory) as Arc<dyn crate::metrics::RegistrySource>),
        });
        server.watcher = Some(watcher);
        let admin = Arc::new(Admin::new(
            lifecycle,
            server.config.control.clone(),
            server.config.deletion.window,
        ));
        // Key changes a crash interrupted finish in the background: until
        // then every version is still readable under its old wrapping.
        let resuming = {
            let admin = Arc::clone(&admin);
            async move {
                match admin.resume_key_changes().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tenants = n, "interrupted key changes finished"),
                    Err(err) => {
                        tracing::warn!(error = %err, "could not list interrupted key changes")
                    }
                }
            }
        };
        server.admin = Some(admin);
        server.rotation = Some(rotation);
        server.issuer = issuer;
        server.registry = Some(Arc::clone(&directory));
        let tasks = &server.tasks;
        tasks.spawn(reloader);
        tasks.spawn(flusher);
        tasks.spawn(watching);
        tasks.spawn(resuming);
        tasks.spawn(rotating);
        tasks.spawn(maintaining);
        tasks.spawn(logging);
        if let Some(listening) = listener_task {
            tasks.spawn(listening);
        }
        Ok(server)
    }

    /// A server whose tenants' keys come from `directory` (tests inject
    /// instrumented providers here).
    pub fn with_directory(
        config: Config,
        directory: Arc<dyn KeyDirectory>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let cache = DekCache::new(config.cache);
        Self::assemble(
            config,
            directory,
            cache,
            Arc::new(crate::access_log::AccessLog::new(None)),
        )
    }

    /// The data plane plus the security parts every server has: policy,
    /// audit log, TLS material (each reloaded in the background).
    fn assemble(
        config: Config,
        directory: Arc<dyn KeyDirectory>,
        cache: DekCache,
        access_log: Arc<crate::access_log::AccessLog>,
    ) -> anyhow::Result<Self> {
        let tasks = Background::default();
        let policy = match &config.server.authz_policy {
            Some(path) => {
                let source = PolicySource::from_file(path).map_err(anyhow::Error::msg)?;
                tasks.spawn(source.reloader(config.tls.reload_interval));
                source
            }
            None => {
                tracing::warn!(
                    "no authorization policy: every caller may call every method for every tenant (plaintext loopback development only)"
                );
                PolicySource::fixed(Policy::allow_all())
            }
        };
        let tls = if config.tls.enabled() {
            let source = TlsSource::load(config.tls.clone())?;
            tasks.spawn(source.reloader());
            Some(source)
        } else {
            None
        };
        let audit =
            Arc::new(AuditLog::open(&config.audit)?.with_access_log(Arc::clone(&access_log)));
        let metrics = Arc::new(Metrics::new(
            config.telemetry.metrics_tenant_labels,
            crate::authz::METHODS,
        ));
        metrics.set_sources(crate::metrics::Sources {
            cache: Some(Arc::new(cache.clone())),
            audit: Some(Arc::clone(&audit) as _),
            ..Default::default()
        });
        let broker = Arc::new(
            Broker::new(directory, cache, config.quota)
                .with_metrics(Arc::clone(&metrics))
                .with_tenant_key_rotation(config.hierarchy.tenant_key_rotation_period),
        );
        // Plaintext past its TTL leaves memory within a quarter of the
        // shorter lifetime even when nothing else touches its shard.
        let sweep = (config.cache.ttl.min(config.cache.tti) / 4).clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(10),
        );
        let cache = broker.cache().clone();
        tasks.spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + sweep, sweep);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                cache.run_pending_tasks().await;
            }
        });
        // Idle tenants' full buckets are dropped now and then, so the
        // limiter's map holds only recently active tenants.
        tasks.spawn(crate::reload::every(
            std::time::Duration::from_secs(60),
            &broker,
            |broker| broker.quota().forget_idle(),
        ));
        Ok(Self {
            broker,
            config,
            policy,
            audit,
            access_log,
            metrics,
            tls,
            admin: None,
            watcher: None,
            rotation: None,
            health_listener: None,
            registry: None,
            issuer: None,
            tasks,
        })
    }

    /// The issuer of customers' Vault login tokens, if configured.
    pub fn issuer(&self) -> Option<&Arc<crate::kms::issuer::Issuer>> {
        self.issuer.as_ref()
    }

    /// Also serve health checks, in plaintext, on `listener`.
    pub fn with_health_listener(mut self, listener: TcpListener) -> Self {
        self.health_listener = Some(listener);
        self
    }

    /// The Prometheus registry (served by `metrics::serve`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The audit log (tests count its records).
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// The tenants' key access log.
    pub fn access_log(&self) -> &Arc<crate::access_log::AccessLog> {
        &self.access_log
    }

    /// The key-state watcher (absent when tests inject their own directory).
    pub fn rotation(&self) -> Option<&Arc<PlatformRotation>> {
        self.rotation.as_ref()
    }

    pub fn watcher(&self) -> Option<&Arc<Watcher>> {
        self.watcher.as_ref()
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    pub fn admin(&self) -> Option<&Arc<Admin>> {
        self.admin.as_ref()
    }

    /// Serves gRPC on `listener` until `shutdown` resolves. Then health turns
    /// NOT_SERVING, the server keeps serving for `shutdown_grace` (so load
    /// balancers stop routing here), stops accepting, and returns once every
    /// in-flight RPC has completed.
    pub async fn run(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && !self.config.server.insecure_plaintext && self.tls.is_none()
        {
            anyhow::bail!("refusing plaintext gRPC on non-loopback address {addr}");
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        // The probe port gets the same handshake, keepalive and idle limits
        // as the main one, and few slots: silent connections cannot pile up
        // there either.
        let probe_connections = crate::net::incoming::ConnectionSettings {
            max_connections: HEALTH_MAX_CONNECTIONS,
            ..self.config.connections
        };
        let health_only = self.health_listener.take().map(|listener| {
            let service = health_service.clone();
            tokio::spawn(async move {
                let (incoming, accepting) =
                    crate::net::incoming::accept(listener, None, probe_connections);
                let _accepting = AbortOnDrop(accepting);
                let served = tonic::transport::Server::builder()
                    .timeout(std::time::Duration::from_secs(5))
                    .http2_keepalive_interval(Some(probe_connections.keepalive_interval))
                    .http2_keepalive_timeout(Some(probe_connections.keepalive_timeout))
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await;
                if let Err(err) = served {
                    tracing::error!(error = %err, "health listener failed");
                }
            })
        });
        let _health_only = health_only.map(AbortOnDrop);
        health.set_serving::<KeyBrokerServer<KeyBrokerApi>>().await;
        health.set_service_status("", ServingStatus::Serving).await;

        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        // grpcurl before 1.9 speaks only v1alpha.
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let observers = Arc::new(Observers {
            audit: Arc::clone(&self.audit),
            metrics: Arc::clone(&self.metrics),
            request_timeout: self.config.server.request_timeout,
            affinity_header: crate::api::affinity::header_key(&self.config.server.affinity_header)
                .map_err(|e| anyhow::anyhow!("affinity_header: {e}"))?,
        });
        let broker_service = KeyBrokerServer::new(KeyBrokerApi::new(
            Arc::clone(&self.broker),
            Arc::clone(&observers),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let admin_service = self.admin.as_ref().map(|admin| {
            KeyAdminServer::new(KeyAdminApi::new(Arc::clone(admin), Arc::clone(&observers)))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
        });
        if admin_service.is_some() {
            health.set_serving::<KeyAdminServer<KeyAdminApi>>().await;
        }
        // `keybroker.Registry`: NOT_SERVING while the registry does not
        // answer and tenants are served from views as last read. For
        // dashboards and alerts, never for readiness: a replica serving
        // from memory through a failover is doing its job.
        let _registry_health = self.registry.clone().map(|directory| {
            let health = health.clone();
            AbortOnDrop(tokio::spawn(async move {
                let mut last = None;
                loop {
                    let status = match directory.registry_outage_since() {
                        None => ServingStatus::Serving,
                        Some(_) => ServingStatus::NotServing,
                    };
                    if last != Some(status) {
                        health.set_service_status(REGISTRY_HEALTH, status).await;
                        last = Some(status);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
            }))
        });

        let grace = self.config.server.shutdown_grace;
        let drain_timeout = self.config.server.shutdown_drain_timeout;
        // Fires when the grace period ends and draining begins.
        let draining = Arc::new(tokio::sync::Notify::new());
        let draining_tx = Arc::clone(&draining);
        let signal = async move {
            shutdown.await;
            tracing::info!(grace = ?grace, "shutting down: health NOT_SERVING, then draining in-flight RPCs");
            health
                .set_not_serving::<KeyBrokerServer<KeyBrokerApi>>()
                .await;
            health
                .set_not_serving::<KeyAdminServer<KeyAdminApi>>()
                .await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            tokio::time::sleep(grace).await;
            draining_tx.notify_one();
        };

        let connections = self.config.connections;
        let (incoming, accepting) =
            crate::net::incoming::accept(listener, self.tls.clone(), connections);
        // Dropped on every return path: stops accepting.
        let _accepting = AbortOnDrop(accepting);
        tracing::info!(%addr, tls = self.tls.is_some(), "keybroker listening");
        // No `.timeout()`: `call::serve` enforces request_timeout without a
        // timer for calls answered at once (cache hits); tonic still honours
        // a client's grpc-timeout.
        let serve = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(connections.keepalive_interval))
            .http2_keepalive_timeout(Some(connections.keepalive_timeout))
            .layer(AuthLayer::new(
                Arc::clone(&self.policy),
                Arc::clone(&observers),
            ))
            // Inside the auth layer: every call is authorized first.
            .layer(DataPlaneLayer::new(broker_service.clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(broker_service)
            .add_optional_service(admin_service)
            .serve_with_incoming_shutdown(incoming, signal);
        // A client that ignores GOAWAY must not keep the process alive.
        let drain_deadline = async {
            draining.notified().await;
            tokio::time::sleep(drain_timeout).await;
        };
        tokio::select! {
            served = serve => served?,
            () = drain_deadline => tracing::warn!(
                timeout = ?drain_timeout,
                "connections still open after the drain timeout; exiting anyway"
            ),
        }
        // Background work stops at its next await and is waited for, before
        // the final usage flush below.
        self.tasks.stop(drain_timeout).await;
        // The access log's last counts, within the drain timeout.
        let pending = self.access_log.pending();
        match tokio::time::timeout(drain_timeout, self.access_log.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, uses = pending, "could not write the key access log at shutdown: these counts are lost")
            }
            Err(_) => tracing::warn!(
                uses = pending,
                "the registry did not take the key access log within the drain timeout: these counts are lost"
            ),
        }
        if let Some(admin) = &self.admin {
            // Within the drain timeout: a registry that does not answer
            // (an outage) must not hold the process past it. Counted first:
            // a flush cut off by the timeout has taken the counts already.
            let pending = admin.directory().unflushed_usage();
            let flushed = tokio::time::timeout(drain_timeout, admin.flush_usage()).await;
            let failed = match flushed {
                Ok(Ok(())) => None,
                Ok(Err(err)) => Some(err.to_string()),
                Err(_) => Some(format!(
                    "the registry did not answer within {drain_timeout:?}"
                )),
            };
            if let Some(error) = failed {
                let (wraps, unwraps) = pending;
                tracing::warn!(
                    error = %error,
                    unflushed_wraps = wraps,
                    unflushed_unwraps = unwraps,
                    "could not flush key usage counters at shutdown: these counts are lost (last-used times and unlink guards read the registry)"
                );
            }
        }
        tracing::info!("keybroker stopped");
        Ok(())
    }
}

fn platform_binding(provider: Arc<LocalKeyring>, reference: &str) -> Binding {
    Binding::active(PLATFORM_BINDING, provider, reference)
}

/// Every background task of a server: spawned through it, cancelled and
/// awaited together at shutdown (tokio-util's `TaskTracker` and
/// `CancellationToken`). A task stops at its next await point; dropping
/// the guard (a server never run) cancels them too.
#[derive(Debug, Default)]
pub(crate) struct Background {
    tracker: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
}

impl Background {
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            stop.run_until_cancelled(task).await;
        });
    }

    /// Cancels every task and waits for them, at most `within`.
    pub(crate) async fn stop(&self, within: std::time::Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tracker.len(),
                "background tasks still running after cancellation"
            );
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Aborts a background task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled: a SIGTERM that arrives
/// between "listening" and the serve loop's first poll still drains instead
/// of killing the process (the default action). Call it inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(sig) => Some(sig),
        Err(err) => {
            tracing::error!(error = %err, signal = name, "cannot listen for the signal; the other one stops the server");
            None
        }
    };
    let terminate = listen(SignalKind::terminate(), "SIGTERM");
    let interrupt = listen(SignalKind::interrupt(), "SIGINT");
    async move {
        let wait = |sig: Option<tokio::signal::unix::Signal>| async move {
            match sig {
                Some(mut sig) => {
                    sig.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(terminate) => {},
            () = wait(interrupt) => {},
        }
    }
}
