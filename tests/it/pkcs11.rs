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

/// Link (verified), generate, unwrap, rewrap, isolation, single flight, and
/// the customer's key destroyed on the token → revoked within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_keys_work_end_to_end_on_softhsm() {
    let label = format!("kek-{}", std::process::id());
    let (_ctx, hsm) = admin_session();
    make_key(&hsm, &label);

    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.pkcs11.module = Some(PathBuf::from(env("KEYBROKER_TEST_PKCS11_MODULE")));
    config.pkcs11.pin_file = Some(PathBuf::from(env("KEYBROKER_TEST_PKCS11_PIN_FILE")));
    config.watcher.interval = Duration::from_millis(300);
    config.quota = keybroker::quota::QuotaSettings::UNLIMITED;
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    create_tenant_with(&mut admin, "acme", KeyPolicy::Keyring, KeyHierarchy::Direct).await;

    // No such object: refused, nothing stored. A module path in the
    // reference is refused before anything is loaded.
    let err = admin
        .link_key(link("acme", "no-such-key"))
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
