//! Keys in a PKCS#11 HSM, against a real token: Debian's SoftHSM, initialised
//! afresh by scripts/test.sh (`SOFTHSM2_CONF` in a temp dir). Each test
//! makes its own AES-256 key object on it through `cryptoki`, as an HSM
//! administrator would, and destroys it to revoke.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use keybroker::proto;
use keybroker::proto::{KeyHierarchy, KeyPolicy};
use tonic::Code;

use crate::common::{
    TestServer, admin_client, create_tenant_with, generate, rewrap, test_config, unwrap,
};

const CTX: &[(&str, &str)] = &[("table", "orders")];
const TOKEN: &str = "keybroker-test";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with scripts/test.sh, which installs SoftHSM \
             (Debian softhsm2) and initialises a token for them"
        )
    })
}

/// The HSM administrator's side: a logged-in session on the test token.
fn admin_session() -> (Pkcs11, Session) {
    let ctx = Pkcs11::new(env("KEYBROKER_TEST_PKCS11_MODULE")).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == TOKEN)
        .expect("the test token");
    let session = ctx.open_rw_session(slot).unwrap();
    let pin = std::fs::read_to_string(env("KEYBROKER_TEST_PKCS11_PIN_FILE")).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::new(pin.into())))
        .unwrap();
    (ctx, session)
}

/// A fresh AES-256 key on the token, non-extractable, encrypt/decrypt only.
fn make_key(session: &Session, label: &str) {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::ValueLen(32.into()),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
        )
        .unwrap();
}

fn destroy_key(session: &Session, label: &str) {
    for handle in session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap()
    {
        session.destroy_object(handle).unwrap();
    }
}

fn link(tenant: &str, object: &str) -> proto::LinkKeyRequest {
    proto::LinkKeyRequest {
        tenant_id: tenant.into(),
        name: "hsm".into(),
        provider: proto::Provider::Pkcs11.into(),
        key_reference: format!("pkcs11:token={TOKEN};object={object}"),
        make_primary: true,
        ..Default::default()
    }
}

/// `config` with the test token's module and PIN file.
fn with_hsm(mut config: keybroker::config::Config) -> keybroker::config::Config {
    config.pkcs11.module = Some(PathBuf::from(env("KEYBROKER_TEST_PKCS11_MODULE")));
    config.pkcs11.pin_file = Some(PathBuf::from(env("KEYBROKER_TEST_PKCS11_PIN_FILE")));
    config
}

/// Calls the server has made to the HSM.
fn hsm_calls(server: &TestServer) -> u64 {
    server
        .directory
        .as_ref()
        .unwrap()
        .pkcs11()
        .unwrap()
        .calls
        .load(std::sync::atomic::Ordering::SeqCst)
}

/// Link (verified), generate, unwrap, rewrap, isolation, single flight, and
/// the customer's key destroyed on the token → revoked within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_keys_work_end_to_end_on_softhsm() {
    // In acme's namespace on the token (pkcs11_tenant_label_prefix).
    let label = format!("acme.kek-{}", std::process::id());
    let (_ctx, hsm) = admin_session();
    make_key(&hsm, &label);

    let dir = tempfile::tempdir().unwrap();
    let mut config = with_hsm(test_config(dir.path()));
    config.watcher.interval = Duration::from_millis(300);
    config.quota = keybroker::quota::QuotaSettings::UNLIMITED;
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    // Direct wraps are refused for HSM keys (the IV budget): a tenant key
    // is what the HSM key wraps.
    create_tenant_with(
        &mut admin,
        "direct",
        KeyPolicy::Keyring,
        KeyHierarchy::Direct,
    )
    .await;
    let err = admin
        .link_key(link("direct", "direct.k"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("2^32"), "{}", err.message());
    create_tenant_with(
        &mut admin,
        "acme",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;

    // No such object: refused, nothing stored. A module path in the
    // reference is refused before anything is loaded.
    let err = admin
        .link_key(link("acme", "acme.no-such-key"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut module = link("acme", &label);
    module.key_reference = format!("pkcs11:token={TOKEN};object={label};module-path=/tmp/evil.so");
    let err = admin.link_key(module).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let linked = admin
        .link_key(link("acme", &label))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(linked.provider(), proto::Provider::Pkcs11);

    let g = generate(&mut broker, "acme", CTX).await.unwrap();
    let back = unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, g.plaintext);
    let moved = rewrap(&mut broker, "acme", CTX, &g.wrapped_key)
        .await
        .unwrap();
    assert_eq!(
        unwrap(&mut broker, "acme", CTX, &moved.wrapped_key)
            .await
            .unwrap()
            .plaintext,
        g.plaintext
    );
    crate::common::assert_isolated_and_single_flight(
        &server,
        &mut admin,
        &mut broker,
        ("acme", "globex"),
        CTX,
        &g,
    )
    .await;

    // The key is destroyed on the token: cached DEKs stop being served.
    destroy_key(&hsm, &label);
    let started = Instant::now();
    loop {
        match unwrap(&mut broker, "acme", CTX, &g.wrapped_key).await {
            Err(s) if s.code() == Code::FailedPrecondition => break,
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "still served after the key was destroyed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("HSM key destroyed -> refused after {:?}", started.elapsed());
    let key = admin
        .get_key(proto::GetKeyRequest {
            tenant_id: "acme".into(),
            name: "hsm".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.state(), proto::KeyState::Revoked);
    assert!(
        key.state_reason.contains("no AES key"),
        "{}",
        key.state_reason
    );
    server.stop().await;
}

/// The start-up error of a server that must not start.
fn start_refused(built: anyhow::Result<keybroker::server::Server>, why: &str) -> String {
    match built {
        Ok(_) => panic!("{why}"),
        Err(err) => format!("{err:#}"),
    }
}

fn keyring_cli(data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .arg("keyring")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--pkcs11-module")
        .arg(env("KEYBROKER_TEST_PKCS11_MODULE"))
        .arg("--pkcs11-pin-file")
        .arg(env("KEYBROKER_TEST_PKCS11_PIN_FILE"))
        .env_remove("KEYBROKER_PLATFORM_KEY")
        .output()
        .unwrap()
}

/// The platform key in the HSM (`serve --platform-key pkcs11:...`): an
/// existing plain keyring is sealed under a token key by `keybroker keyring
/// seal`; every DEK wrapped before stays readable; the file then holds no
/// key in the clear, and without the token nothing starts. The HSM is
/// called once per keyring version when the keyring is loaded, never per
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_keyring_sealed_in_the_hsm() {
    let label = format!("platform-{}", std::process::id());
    let reference = format!("pkcs11:token={TOKEN};object={label}");
    let (_ctx, hsm) = admin_session();
    make_key(&hsm, &label);
    let dir = tempfile::tempdir().unwrap();
    let plain_config = || {
        let mut config = test_config(dir.path());
        config.quota = keybroker::quota::QuotaSettings::UNLIMITED;
        config
    };
    let hsm_config = || {
        let mut config = with_hsm(plain_config());
        config.server.platform_key = Some(reference.clone());
        config
    };

    // Before: a plain keyring, two tenants on the platform key (DEKs wrapped
    // directly, and under a tenant key).
    let server = TestServer::start(plain_config()).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    create_tenant_with(
        &mut admin,
        "direct",
        KeyPolicy::Keyring,
        KeyHierarchy::Direct,
    )
    .await;
    create_tenant_with(
        &mut admin,
        "tree",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    let old_direct = generate(&mut broker, "direct", CTX).await.unwrap();
    let old_tree = generate(&mut broker, "tree", CTX).await.unwrap();
    server.stop().await;

    // The server refuses a plain file under a platform key, and says how to
    // seal it.
    let err = start_refused(
        keybroker::server::Server::build(hsm_config()).await,
        "a plain keyring under --platform-key is refused",
    );
    assert!(
        format!("{err:#}").contains("keybroker keyring seal"),
        "{err:#}"
    );

    let before = std::fs::read_to_string(dir.path().join("platform-keyring.json")).unwrap();
    let sealed = keyring_cli(dir.path(), &["seal", "--platform-key", &reference]);
    assert!(
        sealed.status.success(),
        "{}",
        String::from_utf8_lossy(&sealed.stderr)
    );
    let after = std::fs::read_to_string(dir.path().join("platform-keyring.json")).unwrap();
    let plain: serde_json::Value = serde_json::from_str(&before).unwrap();
    let key_v1 = plain["versions"][0]["key"].as_str().unwrap();
    assert!(
        !after.contains(key_v1),
        "the sealed file still holds the key"
    );
    assert!(after.contains(&reference), "{after}");

    // With the HSM: every old DEK unwraps from an empty cache; new ones too.
    let server = TestServer::start(hsm_config()).await;
    assert_eq!(
        hsm_calls(&server),
        1,
        "one unseal per keyring version at start"
    );
    let mut broker = server.client().await;
    for (tenant, old) in [("direct", &old_direct), ("tree", &old_tree)] {
        let back = unwrap(&mut broker, tenant, CTX, &old.wrapped_key)
            .await
            .unwrap();
        assert_eq!(back.plaintext, old.plaintext, "{tenant}");
        let new = generate(&mut broker, tenant, CTX).await.unwrap();
        let back = unwrap(&mut broker, tenant, CTX, &new.wrapped_key)
            .await
            .unwrap();
        assert_eq!(back.plaintext, new.plaintext, "{tenant}");
    }
    assert_eq!(hsm_calls(&server), 1, "no HSM call per request");

    // Rotation under the seal: the CLI needs the key; the server reloads
    // the new version (one unseal per version) and wraps with it.
    let refused = keyring_cli(dir.path(), &["rotate"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--platform-key"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let rotated = keyring_cli(dir.path(), &["rotate", "--platform-key", &reference]);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let started = Instant::now();
    loop {
        let described = broker
            .describe_key(proto::DescribeKeyRequest {
                tenant_id: "direct".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if described.primary.unwrap().provider_key_version == "2" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "rotation not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        hsm_calls(&server),
        1 + 2,
        "the reload unsealed both versions once"
    );

    // The token key destroyed while serving: this process keeps serving
    // from memory, and says within a reload tick that none could start.
    let keyring = std::sync::Arc::clone(server.directory.as_ref().unwrap().platform_keyring());
    assert_eq!(keyring.seal_usable(), Some(true));
    destroy_key(&hsm, &label);
    let started = Instant::now();
    while keyring.seal_usable() != Some(false) {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "seal loss not noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "HSM platform key destroyed -> noticed after {:?} (100 ms reload interval)",
        started.elapsed()
    );
    let back = unwrap(&mut broker, "direct", CTX, &old_direct.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext, old_direct.plaintext);
    server.stop().await;

    // Without the token key, nothing starts, and the error names the key.
    let err = start_refused(
        keybroker::server::Server::build(hsm_config()).await,
        "a keyring sealed by a destroyed key cannot load",
    );
    assert!(
        err.contains("could not be unsealed") && err.contains(&label),
        "{err}"
    );
    let err = start_refused(
        keybroker::server::Server::build(plain_config()).await,
        "a sealed keyring without --platform-key is refused",
    );
    assert!(err.contains("--platform-key"), "{err}");
}

/// Proof of ownership: the PIN unlocks every object on the token, so a
/// tenant links only labels of its own namespace, and never the key that
/// seals the platform keyring. Refused with 0 HSM calls, nothing stored,
/// saying what to configure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_links_only_its_own_hsm_objects() {
    let pid = std::process::id();
    let (acme_key, seal_key) = (format!("acme.own-{pid}"), format!("acme.seal-{pid}"));
    let (_ctx, hsm) = admin_session();
    make_key(&hsm, &acme_key);
    make_key(&hsm, &seal_key);
    let dir = tempfile::tempdir().unwrap();
    let mut config = with_hsm(test_config(dir.path()));
    // The platform keyring sealed by a key whose label even sits in a
    // tenant's namespace: still no tenant's.
    config.server.platform_key = Some(format!("pkcs11:token={TOKEN};object={seal_key}"));
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    for tenant in ["acme", "globex"] {
        create_tenant_with(
            &mut admin,
            tenant,
            KeyPolicy::Keyring,
            KeyHierarchy::TenantKey,
        )
        .await;
    }
    let before = hsm_calls(&server);
    for (tenant, object, why) in [
        ("globex", acme_key.as_str(), "namespace"),
        ("globex", "platform-anything", "namespace"),
        ("acme", seal_key.as_str(), "seals the platform keyring"),
    ] {
        let err = admin.link_key(link(tenant, object)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(why), "{}", err.message());
        if why == "namespace" {
            assert!(
                err.message().contains(&format!("'{tenant}.'"))
                    && err.message().contains("pkcs11_tenant_label_prefix"),
                "{}",
                err.message()
            );
        }
        let keys = admin
            .list_keys(proto::ListKeysRequest {
                tenant_id: tenant.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .keys;
        assert!(keys.is_empty(), "a refused link was stored: {keys:?}");
    }
    assert_eq!(hsm_calls(&server), before, "a refused link reached the HSM");
    // Its own object: linked, used.
    admin.link_key(link("acme", &acme_key)).await.unwrap();
    assert!(hsm_calls(&server) > before);
    let mut broker = server.client().await;
    let g = generate(&mut broker, "acme", CTX).await.unwrap();
    assert_eq!(
        unwrap(&mut broker, "acme", CTX, &g.wrapped_key)
            .await
            .unwrap()
            .plaintext,
        g.plaintext
    );
    server.stop().await;
    destroy_key(&hsm, &acme_key);
    destroy_key(&hsm, &seal_key);
}

/// The PIN is read from its file only: a PIN in the environment (inherited
/// by children, readable in /proc) stops the server with the fix.
#[tokio::test]
async fn the_pin_is_never_taken_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--pkcs11-module", &env("KEYBROKER_TEST_PKCS11_MODULE")])
        .env("KEYBROKER_PKCS11_PIN", "1234")
        .env_remove("KEYBROKER_PKCS11_PIN_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KEYBROKER_PKCS11_PIN") && err.contains("pkcs11_pin_file"),
        "{err}"
    );
}

/// A direct tenant whose HSM key was linked before LinkKey refused HSM keys
/// for direct tenants (here: a registry restored from such an export) has
/// no new DEK wrapped by it: GenerateDataKey and WrapKey are refused
/// FAILED_PRECONDITION with the budget and what to do, before any HSM call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_key_linked_before_the_rule_wraps_no_direct_dek() {
    let label = format!("acme.old-{}", std::process::id());
    let (_ctx, hsm) = admin_session();
    make_key(&hsm, &label);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = || with_hsm(test_config(&data));
    let server = TestServer::start(config()).await;
    let mut admin = admin_client(&server).await;
    create_tenant_with(
        &mut admin,
        "acme",
        KeyPolicy::Keyring,
        KeyHierarchy::TenantKey,
    )
    .await;
    admin.link_key(link("acme", &label)).await.unwrap();
    server.stop().await;

    // The registry as a release before the rule could have left it: the
    // same link, under a tenant that wraps its DEKs directly.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let backup = dir.path().join("export.json");
    let backup_arg = backup.to_str().unwrap();
    cli(&["registry", "export", "--out", backup_arg]);
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&backup).unwrap()).unwrap();
    let tenants = doc["tables"]["tenants"].as_array_mut().unwrap();
    let acme = tenants.iter_mut().find(|t| t["id"] == "acme").unwrap();
    assert_eq!(acme["key_hierarchy"], "tenant_key");
    acme["key_hierarchy"] = "direct".into();
    std::fs::write(&backup, serde_json::to_vec(&doc).unwrap()).unwrap();
    std::fs::remove_file(data.join("registry.db")).unwrap();
    cli(&["registry", "restore", "--from", backup_arg]);

    let server = TestServer::start(config()).await;
    let before = hsm_calls(&server);
    let mut broker = server.client().await;
    let refused = |err: tonic::Status| {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        for part in ["protects tenant keys only", "2^32", "SetPrimaryKey"] {
            assert!(err.message().contains(part), "{part}: {}", err.message());
        }
        let info = tonic_types::StatusExt::get_details_error_info(&err).unwrap();
        assert_eq!(info.reason, "KEY_CANNOT_WRAP_DIRECTLY");
        assert_eq!(info.metadata["key_binding"], "hsm");
    };
    refused(generate(&mut broker, "acme", CTX).await.unwrap_err());
    refused(
        broker
            .wrap_key(proto::WrapKeyRequest {
                tenant_id: "acme".into(),
                plaintext: vec![7; 32],
                context: CTX
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(
        hsm_calls(&server),
        before,
        "a refused direct wrap reached the HSM"
    );
    server.stop().await;
    destroy_key(&hsm, &label);
}
