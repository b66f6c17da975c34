//! The azure-kv provider, through Microsoft's Rust SDK, against the fake
//! Key Vault and Entra (`fakes/azure`), served under the real host names
//! through a CONNECT tunnel with a test CA. What covers what:
//! - identity: the application not consented in the customer's tenant, a
//!   binding naming another tenant than the vault's, no role on the key →
//!   an actionable FAILED_PRECONDITION at link, nothing stored; a host
//!   outside `azure_vault_domains` → INVALID_ARGUMENT before any call;
//! - the data plane: generate, unwrap, rewrap, tenant and context binding
//!   (our AEAD layer over RSA-OAEP-256), 64 concurrent cold unwraps → one
//!   unwrapKey; a `tenant_key` tenant → one wrapKey for 50 DEKs;
//! - rotation in Key Vault: old DEKs unwrap with `rewrap_recommended`,
//!   RewrapKey moves them to the new version;
//! - key states: disabled → revoked within the watcher bound, re-enabled →
//!   healed; soft-deleted → revoked with the recover command, recovered →
//!   healed;
//! - throttling: a short `Retry-After` is waited for; a long one is
//!   RESOURCE_EXHAUSTED naming the delay, never a revocation;
//! - Managed HSM: an `oct-HSM` key with A256KW;
//! - fidelity: Microsoft's Python SDK (`azure-keyvault-keys`,
//!   `azure-identity`) drives the fake, and keys wrapped on either side
//!   unwrap on the other.

use std::future::Future;
use std::time::{Duration, Instant};

use keybroker::proto;
use keybroker::proto::{KeyHierarchy, KeyPolicy};
use tonic::Code;

use crate::common::{
    TestServer, admin_client, create_tenant_with, generate, no_keys, rewrap, test_config, unwrap,
};
use crate::fakes::azure::{App, FakeAzure};

const CTX: &[(&str, &str)] = &[("table", "orders")];

type Admin = proto::key_admin_client::KeyAdminClient<tonic::transport::Channel>;
type Broker = proto::key_broker_client::KeyBrokerClient<tonic::transport::Channel>;

struct Env {
    fake: FakeAzure,
    app: App,
    /// The customer's Entra tenant, consented, with the vault `contoso`.
    customer: String,
    server: TestServer,
    admin: Admin,
    broker: Broker,
    dir: tempfile::TempDir,
}

impl Env {
    /// What the customer does: consent to the application, assign it the
    /// key role on `vault`, and make the key.
    fn customer_ready(&self, vault: &str, key: &str) {
        self.fake.consent(&self.customer, &self.app.client_id);
        self.fake.grant(vault, &self.app.client_id);
        self.fake.create_key(vault, key);
    }

    /// What proves the key is meant for `tenant`: the customer tags it
    /// `keybroker-tenant=<the tenant's external id>` (onboarding's
    /// `key_owner_tag`).
    async fn tag_for(&mut self, vault: &str, key: &str, tenant: &str) {
        let external_id = crate::common::external_id(&mut self.admin, tenant).await;
        self.fake.tag_owner(vault, key, &external_id);
    }
}

fn link(
    env: &Env,
    tenant: &str,
    name: &str,
    key: &str,
    entra_tenant: &str,
) -> proto::LinkKeyRequest {
    proto::LinkKeyRequest {
        tenant_id: tenant.into(),
        name: name.into(),
        provider: proto::Provider::AzureKeyVault.into(),
        key_reference: format!("{}/keys/{key}", env.fake.vault_url("contoso")),
        azure_tenant_id: entra_tenant.into(),
        make_primary: true,
        ..Default::default()
    }
}

/// How keybroker proves it is the platform's application.
#[derive(Clone, Copy, PartialEq)]
enum Proof {
    Secret,
    /// A federated client assertion in a file (workload identity).
    Federated,
}

async fn env(watcher: Duration) -> Env {
    env_with(watcher, Proof::Secret).await
}

async fn env_with(watcher: Duration, proof: Proof) -> Env {
    let fake = FakeAzure::start().await;
    let app = fake.register_app();
    let customer = fake.add_tenant();
    fake.add_vault("contoso", &customer, false, false);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("azure-secret");
    std::fs::write(&secret, &app.secret).unwrap();
    let assertion = dir.path().join("azure-federated-token");
    std::fs::write(&assertion, format!("assertion-for-{}\n", app.client_id)).unwrap();
    let ca = dir.path().join("azure-ca.pem");
    std::fs::write(&ca, &fake.tunnel.ca_pem).unwrap();
    let mut config = test_config(dir.path());
    config.watcher.interval = watcher;
    config.quota = keybroker::quota::QuotaSettings::UNLIMITED;
    config.azure.client_id = Some(app.client_id.clone());
    match proof {
        Proof::Secret => config.azure.client_secret_file = Some(secret),
        Proof::Federated => config.azure.federated_token_file = Some(assertion),
    }
    config.azure.ca_file = Some(ca);
    config.azure.proxy = Some(fake.tunnel.url.clone());
    config.azure.max_retry_delay = Duration::from_secs(2);
    config.audit.target = keybroker::audit::AuditTarget::File(dir.path().join("audit.log"));
    let server = TestServer::start(config).await;
    let admin = admin_client(&server).await;
    let broker = server.client().await;
    Env {
        fake,
        app,
        customer,
        server,
        admin,
        broker,
        dir,
    }
}

async fn binding(admin: &mut Admin, tenant: &str, name: &str) -> proto::KeyBinding {
    admin
        .get_key(proto::GetKeyRequest {
            tenant_id: tenant.into(),
            name: name.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

/// Waits until `check` holds (the watcher's bound), returning how long.
async fn within<F, Fut>(limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

fn wraps(env: &Env) -> u64 {
    env.fake
        .calls
        .wraps
        .load(std::sync::atomic::Ordering::SeqCst)
}

fn unwraps(env: &Env) -> u64 {
    env.fake
        .calls
        .unwraps
        .load(std::sync::atomic::Ordering::SeqCst)
}

/// LinkKey of `key` in the Managed HSM `mhsm`.
fn hsm_link(
    env: &Env,
    tenant: &str,
    name: &str,
    key: &str,
    customer: &str,
) -> proto::LinkKeyRequest {
    let mut req = link(env, tenant, name, key, customer);
    req.key_reference = format!("{}/keys/{key}", env.fake.vault_url("mhsm"));
    req
}

/// Link with its identity failures, the data plane, isolation, single
/// flight, rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_keys_work_end_to_end() {
    let mut env = env(Duration::from_secs(30)).await;
    // A Managed HSM AES key (A256KW): a tenant's DEKs wrapped directly
    // need a key whose wraps only Key Vault can make; an RSA key's are
    // made by anyone with its public half (see the test below).
    env.fake.add_vault("mhsm", &env.customer, true, true);
    env.fake.create_key("mhsm", "cmek");
    create_tenant_with(
        &mut env.admin,
        "acme",
        KeyPolicy::Keyring,
        KeyHierarchy::Direct,
    )
    .await;
    env.tag_for("mhsm", "cmek", "acme").await;
    let customer = env.customer.clone();
    // Onboarding names the application, the consent URL and the role.
    let onboarding = env
        .admin
        .get_tenant(proto::GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap()
        .onboarding
        .unwrap();
    assert_eq!(onboarding.azure_application_id, env.app.client_id);
    assert_eq!(
        onboarding.azure_consent_url,
        format!(
            "https://login.microsoftonline.com/<CUSTOMER_TENANT_ID>/adminconsent?client_id={}",
            env.app.client_id
        )
    );
    assert_eq!(
        onboarding.azure_role,
        "Key Vault Crypto Service Encryption User"
    );
    assert_eq!(
        onboarding.key_owner_tag,
        format!("keybroker-tenant={}", onboarding.aws_external_id)
    );

    // Not consented yet: the consent URL, nothing stored.
    let err = env
        .admin
        .link_key(hsm_link(&env, "acme", "az", "cmek", &customer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let consent = format!(
        "https://login.microsoftonline.com/{customer}/adminconsent?client_id={}",
        env.app.client_id
    );
    assert!(err.message().contains(&consent), "{}", err.message());
    no_keys(&mut env.admin, "acme").await;

    // Consented in another tenant than the vault's: invalid issuer.
    let elsewhere = env.fake.add_tenant();
    env.fake.consent(&elsewhere, &env.app.client_id);
    let err = env
        .admin
        .link_key(hsm_link(&env, "acme", "az", "cmek", &elsewhere))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("Entra tenant"), "{}", err.message());

    // Consented, no role on the key: the role to assign.
    env.fake.consent(&customer, &env.app.client_id);
    let err = env
        .admin
        .link_key(hsm_link(&env, "acme", "az", "cmek", &customer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("Key Vault Crypto Service Encryption User"),
        "{}",
        err.message()
    );
    no_keys(&mut env.admin, "acme").await;

    // A host that is not Key Vault, a versioned id, a non-GUID tenant:
    // refused before any call.
    let tokens = env
        .fake
        .calls
        .tokens
        .load(std::sync::atomic::Ordering::SeqCst);
    for (reference, tenant) in [
        (
            "https://evil.example.com/keys/cmek".to_owned(),
            customer.clone(),
        ),
        (
            format!(
                "{}/keys/cmek/0123456789abcdef0123456789abcdef",
                env.fake.vault_url("mhsm")
            ),
            customer.clone(),
        ),
        (
            format!("{}/keys/cmek", env.fake.vault_url("mhsm")),
            "contoso.onmicrosoft.com".to_owned(),
        ),
    ] {
        let mut req = hsm_link(&env, "acme", "az", "cmek", &tenant);
        req.key_reference = reference;
        let err = env.admin.link_key(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    assert_eq!(
        env.fake
            .calls
            .tokens
            .load(std::sync::atomic::Ordering::SeqCst),
        tokens,
        "no token requested for a refused reference"
    );

    env.fake.grant("mhsm", &env.app.client_id);
    // The ownership proof: a key tagged for another tenant (or not at all)
    // is refused after the get and before any wrapKey, with the command
    // that tags it; the value found is not echoed.
    env.fake
        .tag_owner("mhsm", "cmek", "kb-0123456789abcdef0123456789abcdef");
    let before = wraps(&env);
    let err = env
        .admin
        .link_key(hsm_link(&env, "acme", "az", "cmek", &customer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let own = crate::common::external_id(&mut env.admin, "acme").await;
    assert!(
        err.message().contains("keybroker-tenant tag names another tenant")
            && err.message().contains(&format!(
                "az keyvault key set-attributes --hsm-name mhsm --name cmek --tags keybroker-tenant={own}"
            ))
            && !err.message().contains("0123456789abcdef"),
        "{}",
        err.message()
    );
    assert_eq!(wraps(&env), before, "no wrapKey before the proof");
    no_keys(&mut env.admin, "acme").await;
    env.tag_for("mhsm", "cmek", "acme").await;
    let linked = env
        .admin
        .link_key(hsm_link(&env, "acme", "az", "cmek", &customer))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(linked.provider(), proto::Provider::AzureKeyVault);
    assert_eq!(linked.azure_tenant_id, customer);
    assert!(linked.role_arn.is_empty());

    // From here on, every call reuses the tenant's cached token.
    let tokens_after_link = env
        .fake
        .calls
        .tokens
        .load(std::sync::atomic::Ordering::SeqCst);

    // One wrapKey per generate; the version is in the envelope.
    let before = wraps(&env);
    let g = generate(&mut env.broker, "acme", CTX).await.unwrap();
    assert_eq!(wraps(&env) - before, 1);
    let v1 = g.key.clone().unwrap().provider_key_version;
    assert_eq!(v1.len(), 32, "{v1}");
    // The audit record names Key Vault's request id for the wrapKey.
    let audit = std::fs::read_to_string(env.dir.path().join("audit.log")).unwrap();
    let record: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert!(
        record["method"]
            .as_str()
            .unwrap()
            .ends_with("GenerateDataKey")
    );
    let request_id = record["provider_request_id"].as_str().unwrap_or_default();
    assert!(env.fake.answered(request_id), "{record}");
    let back = unwrap(&mut env.broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, g.plaintext);
    assert!(!back.rewrap_recommended);
    crate::common::assert_isolated_and_single_flight(
        &env.server,
        &mut env.admin,
        &mut env.broker,
        ("acme", "globex"),
        CTX,
        &g,
    )
    .await;

    // Rotation in Key Vault: new wraps use the new version (learned from
    // the next wrapKey's kid); old DEKs still unwrap, flagged, and move.
    let v2 = env.fake.rotate("mhsm", "cmek");
    let g2 = generate(&mut env.broker, "acme", CTX).await.unwrap();
    assert_eq!(g2.key.unwrap().provider_key_version, v2);
    env.server.broker.cache().purge_all().await;
    let old = unwrap(&mut env.broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(old.plaintext, g.plaintext);
    assert!(old.rewrap_recommended);
    let moved = rewrap(&mut env.broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(moved.key.unwrap().provider_key_version, v2);
    let back = unwrap(&mut env.broker, "acme", CTX, &moved.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, g.plaintext);
    assert!(!back.rewrap_recommended);

    // A forged version in the envelope costs no Key Vault call.
    let mut envelope = keybroker::envelope::Envelope::parse(&g.wrapped_key).unwrap();
    envelope.provider_key_version = "../../secrets/x".into();
    let forged = envelope.encode();
    let calls = unwraps(&env);
    let err = unwrap(&mut env.broker, "acme", CTX, &forged)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(unwraps(&env), calls);
    assert_eq!(
        env.fake
            .calls
            .tokens
            .load(std::sync::atomic::Ordering::SeqCst),
        tokens_after_link,
        "one Entra token per customer tenant, reused by every call"
    );
    env.server.stop().await;
}

/// Disable, soft-delete and throttling in the vault, against the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_key_states_revoke_and_heal() {
    let mut env = env(Duration::from_millis(300)).await;
    let customer = env.customer.clone();
    env.fake.add_vault("mhsm", &customer, true, true);
    env.customer_ready("mhsm", "cmek");
    create_tenant_with(
        &mut env.admin,
        "acme",
        KeyPolicy::Keyring,
        KeyHierarchy::Direct,
    )
    .await;
    env.tag_for("mhsm", "cmek", "acme").await;
    env.admin
        .link_key(hsm_link(&env, "acme", "az", "cmek", &customer))
        .await
        .unwrap();
    let g = generate(&mut env.broker, "acme", CTX).await.unwrap();
    unwrap(&mut env.broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();

    let refused = |broker: &Broker, wrapped: Vec<u8>| {
        let mut broker = broker.clone();
        async move {
            matches!(unwrap(&mut broker, "acme", CTX, &wrapped).await,
                Err(s) if s.code() == Code::FailedPrecondition)
        }
    };
    let served = |broker: &Broker, wrapped: Vec<u8>| {
        let mut broker = broker.clone();
        async move { unwrap(&mut broker, "acme", CTX, &wrapped).await.is_ok() }
    };

    // Disabled in the vault: the cached DEK stops being served.
    env.fake.set_enabled("mhsm", "cmek", false);
    let took = within(Duration::from_secs(3), || {
        refused(&env.broker, g.wrapped_key.clone())
    })
    .await;
    println!("Key Vault key disabled -> cached DEK refused after {took:?} (300 ms watcher)");
    let key = binding(&mut env.admin, "acme", "az").await;
    assert_eq!(key.state(), proto::KeyState::Revoked);
    assert!(
        key.state_reason.contains("disabled"),
        "{}",
        key.state_reason
    );
    env.fake.set_enabled("mhsm", "cmek", true);
    within(Duration::from_secs(3), || {
        served(&env.broker, g.wrapped_key.clone())
    })
    .await;
    assert_eq!(
        binding(&mut env.admin, "acme", "az").await.state(),
        proto::KeyState::Active
    );

    // Soft-deleted: revoked, with the command that recovers it.
    env.fake.soft_delete("mhsm", "cmek");
    within(Duration::from_secs(3), || {
        refused(&env.broker, g.wrapped_key.clone())
    })
    .await;
    let key = binding(&mut env.admin, "acme", "az").await;
    assert_eq!(key.state(), proto::KeyState::Revoked);
    assert!(
        key.state_reason
            .contains("az keyvault key recover --hsm-name mhsm --name cmek"),
        "{}",
        key.state_reason
    );
    env.fake.recover("mhsm", "cmek");
    within(Duration::from_secs(3), || {
        served(&env.broker, g.wrapped_key.clone())
    })
    .await;

    // Throttled with a short Retry-After: waited for, served.
    env.server.broker.cache().purge_all().await;
    env.fake.throttle(1, 1);
    let started = Instant::now();
    let back = unwrap(&mut env.broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, g.plaintext);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    // A long one: RESOURCE_EXHAUSTED naming the delay, binding untouched.
    env.server.broker.cache().purge_all().await;
    env.fake.throttle(1, 30);
    let err = unwrap(&mut env.broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("retry after 30 s"),
        "{}",
        err.message()
    );
    assert_eq!(
        binding(&mut env.admin, "acme", "az").await.state(),
        proto::KeyState::Active
    );

    // The role removed: revoked (access denied), restored: healed.
    env.fake.revoke_role("mhsm", &env.app.client_id);
    within(Duration::from_secs(3), || {
        refused(&env.broker, g.wrapped_key.clone())
    })
    .await;
    env.fake.grant("mhsm", &env.app.client_id);
    within(Duration::from_secs(3), || {
        served(&env.broker, g.wrapped_key.clone())
    })
    .await;
    env.server.stop().await;
}

/// An RSA key's wraps are made by anyone with its public half: linked to a
/// tenant whose DEKs it would wrap directly it is refused (nothing
/// stored); under a tenant key it protects tenant key versions only, and a
/// wrapped key claiming to be sealed directly under it (what a forger
/// makes) is refused before Key Vault is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keys_never_vouch_for_a_direct_wrap() {
    let mut env = env(Duration::from_secs(30)).await;
    let customer = env.customer.clone();
    env.customer_ready("contoso", "cmek");
    for (tenant, hierarchy) in [
        ("direct", KeyHierarchy::Direct),
        ("tree", KeyHierarchy::TenantKey),
    ] {
        create_tenant_with(&mut env.admin, tenant, KeyPolicy::Keyring, hierarchy).await;
    }
    env.tag_for("contoso", "cmek", "direct").await;
    let err = env
        .admin
        .link_key(link(&env, "direct", "az", "cmek", &customer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("RSA") && err.message().contains("TENANT_KEY"),
        "{}",
        err.message()
    );
    no_keys(&mut env.admin, "direct").await;

    env.tag_for("contoso", "cmek", "tree").await;
    env.admin
        .link_key(link(&env, "tree", "az", "cmek", &customer))
        .await
        .unwrap();
    let g = generate(&mut env.broker, "tree", CTX).await.unwrap();
    // A direct wrap under the RSA key, as a forger would make one (its
    // bytes need not even be valid: it is refused before any call).
    let forged = keybroker::envelope::Envelope {
        tenant_id: "tree".into(),
        key_binding: "az".into(),
        provider: keybroker::kms::ProviderKind::AzureKeyVault,
        provider_key_version: "0123456789abcdef0123456789abcdef".into(),
        ciphertext: vec![1, 1, 0, 4, 9, 9, 9, 9, 7, 7, 7],
        tenant_key_version: 0,
        incarnation: keybroker::envelope::Envelope::parse(&g.wrapped_key)
            .unwrap()
            .incarnation,
    }
    .encode();
    let before = unwraps(&env);
    let err = unwrap(&mut env.broker, "tree", CTX, &forged)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("not made by keybroker"),
        "{}",
        err.message()
    );
    assert_eq!(unwraps(&env), before, "a forged wrap reached Key Vault");
    assert_eq!(
        unwrap(&mut env.broker, "tree", CTX, &g.wrapped_key)
            .await
            .unwrap()
            .plaintext,
        g.plaintext
    );
    env.server.stop().await;
}

/// A Managed HSM AES key (A256KW), with keybroker authenticating by a
/// federated client assertion, and a `tenant_key` tenant: 50 DEKs cost one
/// wrapKey (the tenant key version, minted by the first wrap), and
/// unwrapping them from an empty DEK cache at most one unwrapKey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_managed_hsm_and_tenant_keys() {
    // keybroker proves its identity with a federated assertion here.
    let mut env = env_with(Duration::from_secs(30), Proof::Federated).await;
    let customer = env.customer.clone();
    env.fake.add_vault("hsm1", &customer, true, true);
    env.customer_ready("hsm1", "aes");
    create_tenant_with(
        &mut env.admin,
        "tree",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    env.tag_for("hsm1", "aes", "tree").await;
    let mut req = link(&env, "tree", "hsm", "aes", &customer);
    req.key_reference = format!("{}/keys/aes", env.fake.vault_url("hsm1"));
    let before = wraps(&env);
    env.admin.link_key(req).await.unwrap();
    let at_link = wraps(&env) - before;
    println!("wrapKey calls at link (verification): {at_link}");
    assert_eq!(at_link, 1, "the verification round trip");
    let before = wraps(&env);
    let mut deks = Vec::new();
    for _ in 0..50 {
        deks.push(generate(&mut env.broker, "tree", CTX).await.unwrap());
    }
    assert_eq!(
        wraps(&env) - before,
        1,
        "one wrapKey (the tenant key), none per DEK"
    );
    env.server.broker.cache().purge_all().await;
    let before = unwraps(&env);
    for g in &deks {
        let back = unwrap(&mut env.broker, "tree", CTX, &g.wrapped_key)
            .await
            .unwrap();
        assert_eq!(back.plaintext, g.plaintext);
    }
    assert!(
        unwraps(&env) - before <= 1,
        "at most the tenant key's unwrapKey"
    );
    env.server.stop().await;
}

/// The fake's fidelity: Microsoft's Python SDK drives it through every
/// behaviour the provider relies on; a key the fake wrapped unwraps locally
/// with the private JWK (`CryptographyClient.from_jwk`), and one Python
/// wrapped through the fake unwraps through keybroker's Rust provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_python_sdk_agrees_with_the_fake() {
    let env = env(Duration::from_secs(30)).await;
    let customer = env.customer.clone();
    env.customer_ready("contoso", "pykey");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &env.fake.tunnel.ca_pem).unwrap();
    // Another application, consented but without a role; a tenant that
    // never consented; a tenant that does not exist.
    let no_role = env.fake.register_app();
    env.fake.consent(&customer, &no_role.client_id);
    let unconsented = env.fake.add_tenant();
    let challenges = env
        .fake
        .calls
        .challenges
        .load(std::sync::atomic::Ordering::SeqCst);
    let input = serde_json::json!({
        "tenant": customer,
        "client_id": env.app.client_id,
        "client_secret": env.app.secret,
        "norole_client_id": no_role.client_id,
        "norole_secret": no_role.secret,
        "unconsented_tenant": unconsented,
        "unknown_tenant": crate::fakes::azure::random_guid(),
        "vault_url": env.fake.vault_url("contoso"),
        "jwk": env.fake.private_jwk("contoso", "pykey"),
    });
    let report = crate::common::python_fidelity(
        "azure_fidelity.py",
        "azure-keyvault-keys",
        vec![input.to_string()],
        vec![
            ("HTTPS_PROXY", env.fake.tunnel.url.clone()),
            ("REQUESTS_CA_BUNDLE", ca.display().to_string()),
            ("SSL_CERT_FILE", ca.display().to_string()),
        ],
        &[
            "challenge_then_token",
            "tags_round_trip",
            "get_key_public_jwk",
            "wrap_names_version",
            "unwrap_round_trip",
            "fake_wrap_opens_locally_with_jwk",
            "local_wrap_opens_in_fake",
            "bad_ciphertext_bad_parameter",
            "disabled_key_forbidden",
            "expired_key_forbidden",
            "rotate_keeps_old_versions",
            "soft_delete_not_found_with_recovery_hint",
            "recover_restores",
            "throttled_retry_after_honoured",
            "no_role_forbidden",
            "unconsented_app_aadsts700016",
            "unknown_tenant_aadsts90002",
            "wrong_secret_aadsts7000215",
        ],
    )
    .await;
    assert!(
        env.fake
            .calls
            .challenges
            .load(std::sync::atomic::Ordering::SeqCst)
            > challenges,
        "the Python SDK met the challenge"
    );

    // A key Python wrapped (RSA-OAEP-256 with the public key) is unwrapped by
    // keybroker's provider through the fake: the Rust SDK reads what the
    // Python SDK wrote.
    let key_id = report["python_wrapped"]["kid"].as_str().unwrap();
    let version = key_id.rsplit('/').next().unwrap().to_owned();
    let wrapped = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        report["python_wrapped"]["value"].as_str().unwrap(),
    )
    .unwrap();
    let provider = {
        let directory = env.server.directory.as_ref().unwrap();
        let azure = directory.azure().unwrap();
        azure.key(
            keybroker::kms::azure::AzureKeyRef::parse(
                &format!("{}/keys/pykey", env.fake.vault_url("contoso")),
                &azure.settings().vault_domains,
            )
            .unwrap(),
            customer.clone(),
        )
    };
    let kek = provider.unwrap_raw(&version, &wrapped).await.unwrap();
    assert_eq!(
        hex::encode(kek.expose()),
        report["python_wrapped"]["plaintext_hex"].as_str().unwrap()
    );
    env.server.stop().await;
}

/// One customer's key never serves another tenant, even one naming the
/// customer's Entra tenant (where the platform's application is
/// consented). A key another tenant linked is refused before any Entra or
/// Key Vault call, without naming that tenant; a key of the customer not
/// linked yet is refused by its tag (it names the owner's tenant) after the
/// get and before any wrapKey. Nothing is stored either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_key_is_refused_without_a_wrap() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut env = env(Duration::from_secs(30)).await;
    let customer = env.customer.clone();
    env.fake.add_vault("mhsm", &customer, true, true);
    env.customer_ready("mhsm", "linked");
    env.fake.create_key("mhsm", "unlinked");
    for tenant in ["acme", "intruder"] {
        create_tenant_with(
            &mut env.admin,
            tenant,
            KeyPolicy::Keyring,
            KeyHierarchy::TenantKey,
        )
        .await;
    }
    env.tag_for("mhsm", "linked", "acme").await;
    env.tag_for("mhsm", "unlinked", "acme").await;
    env.admin
        .link_key(hsm_link(&env, "acme", "az", "linked", &customer))
        .await
        .unwrap();
    let calls = |env: &Env| {
        let c = &env.fake.calls;
        [&c.tokens, &c.gets, &c.wraps, &c.unwraps].map(|n| n.load(SeqCst))
    };

    let before = calls(&env);
    let err = env
        .admin
        .link_key(hsm_link(&env, "intruder", "stolen", "linked", &customer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("is linked by another tenant") && !err.message().contains("acme"),
        "{}",
        err.message()
    );
    assert_eq!(calls(&env), before, "no Entra or Key Vault call");

    let err = env
        .admin
        .link_key(hsm_link(&env, "intruder", "stolen", "unlinked", &customer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("keybroker-tenant tag names another tenant"),
        "{}",
        err.message()
    );
    let [_, gets, wraps, unwraps] = calls(&env);
    assert_eq!(
        (gets, wraps, unwraps),
        (before[1] + 1, before[2], before[3]),
        "one get, no wrapKey or unwrapKey"
    );
    no_keys(&mut env.admin, "intruder").await;
}
