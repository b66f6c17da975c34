//! Test harness: real servers on 127.0.0.1:0 reached through the generated
//! client, plus an instrumented provider for latency and call counting.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keybroker::broker::Broker;
use keybroker::config::Config;
use keybroker::keys::{Binding, PLATFORM_BINDING, PlatformOnly};
use keybroker::kms::local::LocalKeyring;
use keybroker::kms::{
    Ciphertext, KeyDescription, KeyProvider, ProviderError, ProviderKind, WrapContext,
};
use keybroker::proto::key_admin_client::KeyAdminClient;
use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::secret::SecretBytes;
use keybroker::server::Server;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub(crate) fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.data_dir = data_dir.to_owned();
    config.server.keyring_reload_interval = Duration::from_millis(100);
    config
}

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) broker: Arc<Broker>,
    pub(crate) audit: Arc<keybroker::audit::AuditLog>,
    /// The tenants' key access log (kept only with a registry).
    pub(crate) access_log: Arc<keybroker::access_log::AccessLog>,
    /// The registry's view (absent with an injected directory).
    pub(crate) directory: Option<Arc<keybroker::registry::directory::RegistryDirectory>>,
    /// The key-state watcher (absent with an injected directory).
    pub(crate) watcher: Option<Arc<keybroker::control::watcher::Watcher>>,
    /// Automatic platform keyring rotation (absent with an injected directory).
    pub(crate) rotation: Option<Arc<keybroker::control::rotation::PlatformRotation>>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    /// The embedded default on `config`.
    pub(crate) async fn start(config: Config) -> Self {
        let aws = crate::aws_support::test_sdk_config(&config.aws.region);
        Self::serve(Server::build_with(config, Some(aws)).await.unwrap()).await
    }

    /// Every tenant on the platform key, served by `provider`.
    pub(crate) async fn start_with_provider(
        config: Config,
        provider: Arc<dyn KeyProvider>,
    ) -> Self {
        let binding = Binding::active(PLATFORM_BINDING, provider, "test-keyring");
        let directory = Arc::new(PlatformOnly::new(Arc::new(binding)));
        Self::serve(Server::with_directory(config, directory).unwrap()).await
    }

    pub(crate) async fn serve(server: Server) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let broker = Arc::clone(server.broker());
        let audit = Arc::clone(server.audit());
        let access_log = Arc::clone(server.access_log());
        let directory = server.admin().map(|a| Arc::clone(a.directory()));
        let watcher = server.watcher().map(Arc::clone);
        let rotation = server.rotation().map(Arc::clone);
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            broker,
            audit,
            access_log,
            directory,
            watcher,
            rotation,
            shutdown: Some(tx),
            handle,
        }
    }

    /// Watcher passes completed so far.
    pub(crate) fn watcher_passes(&self) -> u64 {
        self.watcher.as_ref().map_or(0, |w| w.passes())
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn client(&self) -> KeyBrokerClient<Channel> {
        KeyBrokerClient::connect(self.url()).await.unwrap()
    }

    pub(crate) fn decrypt_calls(&self) -> u64 {
        self.broker.provider_calls().decrypt.load(Ordering::SeqCst)
    }

    pub(crate) fn encrypt_calls(&self) -> u64 {
        self.broker.provider_calls().encrypt.load(Ordering::SeqCst)
    }

    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.await.unwrap().unwrap();
    }
}

/// A local keyring that sleeps before every call and counts them, standing
/// in for a remote KMS.
#[derive(Debug)]
pub(crate) struct SlowKeyring {
    inner: LocalKeyring,
    delay: Duration,
    /// What it reports itself as: remote kinds are subject to the KMS quota.
    kind: ProviderKind,
    pub(crate) decrypts: AtomicU64,
}

impl SlowKeyring {
    pub(crate) fn new(delay: Duration) -> Self {
        Self {
            inner: LocalKeyring::from_material("platform", &[SecretBytes::random(32).unwrap()])
                .unwrap(),
            delay,
            kind: ProviderKind::Local,
            decrypts: AtomicU64::new(0),
        }
    }

    /// Stands in for a remote KMS (reports itself as AWS KMS).
    pub(crate) fn remote(delay: Duration) -> Self {
        Self {
            kind: ProviderKind::AwsKms,
            ..Self::new(delay)
        }
    }
}

#[async_trait]
impl KeyProvider for SlowKeyring {
    fn kind(&self) -> ProviderKind {
        self.kind
    }

    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        tokio::time::sleep(self.delay).await;
        self.inner.encrypt(plaintext, wrap).await
    }

    async fn decrypt(
        &self,
        key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError> {
        self.decrypts.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.inner.decrypt(key_version, ciphertext, wrap).await
    }

    async fn describe(&self) -> Result<KeyDescription, ProviderError> {
        self.inner.describe().await
    }

    fn current_version(&self) -> Option<String> {
        self.inner.current_version()
    }
}

/// Root of the repository (tools live in `.tools/`).
pub(crate) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A test tool installed by scripts/test.sh. A missing tool fails the test
/// with instructions; it is never a silent skip.
pub(crate) fn tool(name: &str, env_var: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env_var) {
        return PathBuf::from(path);
    }
    let path = repo_root().join(".tools/bin").join(name);
    assert!(
        path.exists(),
        "{name} is not installed at {}: run scripts/test.sh (it installs every test tool into .tools/), or set {env_var}",
        path.display()
    );
    path
}

/// A loopback port nothing listens on now (for a server whose address must
/// be known before it starts).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Retries `call` while it answers UNAVAILABLE (a server or the registry
/// (re)starting), for at most `within`; the last answer otherwise.
pub(crate) async fn while_unavailable<T, F, Fut>(
    within: Duration,
    mut call: F,
) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let started = std::time::Instant::now();
    loop {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable && started.elapsed() < within => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

pub(crate) fn ctx(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A fresh, empty PostgreSQL database on the server scripts/test.sh starts
/// (KEYBROKER_TEST_POSTGRES_URL points at its maintenance database).
pub(crate) async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let base = std::env::var("KEYBROKER_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "KEYBROKER_TEST_POSTGRES_URL is not set: run the tests with scripts/test.sh, which \
             starts a PostgreSQL server (Debian's postgresql package, installed if absent) on a \
             loopback port and sets it"
        )
    });
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL at {base}: {e}"));
    let name = format!(
        "kb_{}",
        hex::encode(SecretBytes::random(6).unwrap().expose())
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

/// Calls the admin API of a test server.
pub(crate) async fn admin_client(server: &TestServer) -> KeyAdminClient<Channel> {
    KeyAdminClient::connect(server.url()).await.unwrap()
}

/// 32 random bytes in base64: customer key material.
pub(crate) fn random_material() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(SecretBytes::random(32).unwrap().expose())
}

/// UnwrapKey of `wrapped` for `tenant` under `context`.
pub(crate) fn unwrap_req(
    tenant: &str,
    context: &[(&str, &str)],
    wrapped: &[u8],
) -> keybroker::proto::UnwrapKeyRequest {
    keybroker::proto::UnwrapKeyRequest {
        tenant_id: tenant.into(),
        context: ctx(context),
        wrapped_key: wrapped.to_vec().into(),
        justification: None,
    }
}

/// GenerateDataKey of the default spec for `tenant` under `context`.
pub(crate) fn generate_req(
    tenant: &str,
    context: &[(&str, &str)],
) -> keybroker::proto::GenerateDataKeyRequest {
    keybroker::proto::GenerateDataKeyRequest {
        tenant_id: tenant.into(),
        context: ctx(context),
        key_spec: keybroker::proto::KeySpec::Unspecified.into(),
        justification: None,
    }
}

/// GenerateDataKey for `tenant` under `context`.
pub(crate) async fn generate(
    broker: &mut KeyBrokerClient<Channel>,
    tenant: &str,
    context: &[(&str, &str)],
) -> Result<keybroker::proto::GenerateDataKeyResponse, tonic::Status> {
    broker
        .generate_data_key(generate_req(tenant, context))
        .await
        .map(tonic::Response::into_inner)
}

/// UnwrapKey of `wrapped` for `tenant` under `context`.
pub(crate) async fn unwrap(
    broker: &mut KeyBrokerClient<Channel>,
    tenant: &str,
    context: &[(&str, &str)],
    wrapped: &[u8],
) -> Result<keybroker::proto::UnwrapKeyResponse, tonic::Status> {
    broker
        .unwrap_key(unwrap_req(tenant, context, wrapped))
        .await
        .map(tonic::Response::into_inner)
}

/// RewrapKey of `wrapped` for `tenant` under `context`.
pub(crate) async fn rewrap(
    broker: &mut KeyBrokerClient<Channel>,
    tenant: &str,
    context: &[(&str, &str)],
    wrapped: &[u8],
) -> Result<keybroker::proto::RewrapKeyResponse, tonic::Status> {
    broker
        .rewrap_key(keybroker::proto::RewrapKeyRequest {
            tenant_id: tenant.into(),
            wrapped_key: wrapped.to_vec(),
            context: ctx(context),
            justification: None,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// CreateTenant with `policy` and the `direct` hierarchy (what most suites
/// test: each DEK wrapped by the tenant's key); the tenant as created.
pub(crate) async fn create_tenant(
    admin: &mut KeyAdminClient<Channel>,
    tenant: &str,
    policy: keybroker::proto::KeyPolicy,
) -> keybroker::proto::Tenant {
    create_tenant_with(
        admin,
        tenant,
        policy,
        keybroker::proto::KeyHierarchy::Direct,
    )
    .await
}

/// CreateTenant with `policy` and `hierarchy`; the tenant as created.
pub(crate) async fn create_tenant_with(
    admin: &mut KeyAdminClient<Channel>,
    tenant: &str,
    policy: keybroker::proto::KeyPolicy,
    hierarchy: keybroker::proto::KeyHierarchy,
) -> keybroker::proto::Tenant {
    admin
        .create_tenant(keybroker::proto::CreateTenantRequest {
            tenant_id: tenant.into(),
            key_policy: policy.into(),
            key_hierarchy: hierarchy.into(),
            newest_import_primary: false,
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap()
}

/// The tenant's external id: what the customer's AWS trust policy requires,
/// and the value of the `keybroker-tenant` label (Cloud KMS) or tag (Key
/// Vault) that proves their key is meant for the tenant.
pub(crate) async fn external_id(admin: &mut KeyAdminClient<Channel>, tenant: &str) -> String {
    admin
        .get_tenant(keybroker::proto::GetTenantRequest {
            tenant_id: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap()
        .onboarding
        .unwrap()
        .aws_external_id
}

/// The tenant has no key: a refused link stored nothing.
pub(crate) async fn no_keys(admin: &mut KeyAdminClient<Channel>, tenant: &str) {
    let keys = admin
        .list_keys(keybroker::proto::ListKeysRequest {
            tenant_id: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.is_empty(), "a refused link stored {keys:?}");
}

/// What every customer-key provider owes once a key is linked for
/// `tenants.0` and `g` was generated under `context`: another context is
/// refused by the provider's AAD (`INVALID_ARGUMENT`), another tenant
/// (`tenants.1`, created here) is refused (`PERMISSION_DENIED`), and 64
/// concurrent cold unwraps of one new wrapped key make exactly one provider
/// call (of the DEK, or of the tenant key that sealed it).
pub(crate) async fn assert_isolated_and_single_flight(
    server: &TestServer,
    admin: &mut KeyAdminClient<Channel>,
    broker: &mut KeyBrokerClient<Channel>,
    (tenant, other_tenant): (&str, &str),
    context: &[(&str, &str)],
    g: &keybroker::proto::GenerateDataKeyResponse,
) {
    let other = unwrap(broker, tenant, &[("table", "elsewhere")], &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::InvalidArgument, "{other:?}");
    create_tenant(admin, other_tenant, keybroker::proto::KeyPolicy::Keyring).await;
    let cross = unwrap(broker, other_tenant, context, &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(cross.code(), tonic::Code::PermissionDenied, "{cross:?}");

    let cold = generate(broker, tenant, context).await.unwrap();
    // Cold: for a tenant-key tenant, its tenant key is what is loaded once.
    server.broker.cache().purge_all().await;
    let before = server.decrypt_calls();
    let all = futures::future::join_all((0..64).map(|_| {
        let mut b = broker.clone();
        let wrapped = cold.wrapped_key.clone();
        async move { unwrap(&mut b, tenant, context, &wrapped).await }
    }))
    .await;
    for r in all {
        assert_eq!(r.unwrap().plaintext, cold.plaintext);
    }
    assert_eq!(server.decrypt_calls() - before, 1, "single flight");
}

/// Runs a fidelity script of `tests/support` with the test venv's Python
/// (installed by scripts/test.sh; `package` names what it needs), checks
/// that it passed and reported every check in `expected`, and returns its
/// report (the last line it printed, JSON).
pub(crate) async fn python_fidelity(
    script: &str,
    package: &str,
    args: Vec<String>,
    envs: Vec<(&'static str, String)>,
    expected: &[&str],
) -> serde_json::Value {
    let python = repo_root().join(".tools/venv/bin/python");
    assert!(
        python.exists(),
        "{package} is not installed: run scripts/test.sh (it installs it into .tools/venv)"
    );
    let script = repo_root().join("tests/support").join(script);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args(args)
            .envs(envs)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python fidelity checks failed:\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for check in expected {
        assert!(
            names.contains(check),
            "check {check} missing from {names:?}"
        );
    }
    report
}

/// A DEK as keybroker wrapped it before incarnations and tenant keys for
/// everyone: format 1, directly by the platform keyring in `data_dir`
/// (its newest version), bound to tenant and context only. Upgrades must
/// keep these readable until the tenant id is deleted.
pub(crate) async fn legacy_platform_dek(
    data_dir: &Path,
    tenant: &str,
    context: &[(&str, &str)],
) -> (Vec<u8>, Vec<u8>) {
    let keyring = LocalKeyring::open_or_create(
        PLATFORM_BINDING,
        &keybroker::config::platform_keyring_path(data_dir),
    )
    .unwrap();
    let context = keybroker::context::Context::new(
        context
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
    .unwrap();
    let plaintext = SecretBytes::random(32).unwrap();
    let ciphertext = keyring
        .encrypt(
            &plaintext,
            WrapContext {
                tenant_id: tenant,
                context: &context,
            },
        )
        .await
        .unwrap();
    let wrapped = keybroker::envelope::Envelope {
        tenant_id: tenant.to_owned(),
        key_binding: PLATFORM_BINDING.to_owned(),
        provider: ProviderKind::Local,
        provider_key_version: ciphertext.key_version,
        ciphertext: ciphertext.bytes,
        tenant_key_version: 0,
        incarnation: 0,
    }
    .encode();
    (plaintext.expose().to_vec(), wrapped)
}
