//! Tests of `kms/local/mod.rs`.

use super::file::private_mode;
use super::*;
use crate::context::Context;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

fn ctx(pairs: &[(&str, &str)]) -> Context {
    Context::new(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    )
    .unwrap()
}

#[tokio::test]
async fn created_0600_rotates_and_old_versions_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/platform-keyring.json");
    let ring = LocalKeyring::open_or_create("platform", &path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let c = ctx(&[("table", "t1")]);
    let wrap = WrapContext {
        tenant_id: "acme",
        context: &c,
    };
    let dek = SecretBytes::random(32).unwrap();
    let v1 = ring.encrypt(&dek, wrap).await.unwrap();
    assert_eq!(v1.key_version, "1");

    assert_eq!(rotate_keyring_file(&path, None).unwrap(), 2);
    assert!(ring.reload_if_changed().unwrap());
    assert!(!ring.reload_if_changed().unwrap());
    let v2 = ring.encrypt(&dek, wrap).await.unwrap();
    assert_eq!(v2.key_version, "2");
    for ct in [&v1, &v2] {
        let back = ring
            .decrypt(&ct.key_version, &ct.bytes, wrap)
            .await
            .unwrap();
        assert_eq!(back.expose(), dek.expose());
    }
}

/// Keys wrapped before the `seal` construction (nonce || AES-GCM under
/// the version key) still unwrap; new wraps use the new construction.
#[tokio::test]
async fn legacy_wraps_stay_readable() {
    let material = SecretBytes::new(vec![5u8; 32]);
    // Material stored before the upgrade: its version may hold them.
    let ring = LocalKeyring::from_imported("k", std::slice::from_ref(&material), None).unwrap();
    let context = ctx(&[("a", "1")]);
    let wrap = WrapContext {
        tenant_id: "acme",
        context: &context,
    };
    let legacy_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, material.expose()).unwrap());
    let nonce = [9u8; NONCE_LEN];
    let mut body = b"old dek".to_vec();
    legacy_key
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(wrap.aad().as_slice()),
            &mut body,
        )
        .unwrap();
    let legacy = [nonce.as_slice(), &body].concat();
    assert!(!crate::seal::is_sealed(&legacy));
    let counted = LEGACY_UNWRAPS.load(std::sync::atomic::Ordering::Relaxed);
    let back = ring.decrypt("1", &legacy, wrap).await.unwrap();
    assert_eq!(back.expose(), b"old dek");
    assert!(
        LEGACY_UNWRAPS.load(std::sync::atomic::Ordering::Relaxed) > counted,
        "a legacy unwrap was not counted"
    );

    // The operator's switch: refused, naming it; new wraps unaffected.
    ring.set_legacy_wraps(LegacyWraps::Refuse);
    match ring.decrypt("1", &legacy, wrap).await {
        Err(ProviderError::VersionDisabled(why)) => {
            assert!(why.contains("legacy_local_wraps"), "{why}")
        }
        other => panic!("a legacy wrap was not refused: {other:?}"),
    }
    let sealed = ring
        .encrypt(&SecretBytes::new(b"x".to_vec()), wrap)
        .await
        .unwrap();
    assert_eq!(
        ring.decrypt("1", &sealed.bytes, wrap)
            .await
            .unwrap()
            .expose(),
        b"x"
    );
    ring.set_legacy_wraps(LegacyWraps::Accept);

    let new = ring
        .encrypt(&SecretBytes::new(b"new dek".to_vec()), wrap)
        .await
        .unwrap();
    assert!(crate::seal::is_sealed(&new.bytes));
    assert_eq!(new.bytes.len(), crate::seal::OVERHEAD + 7);
    assert_eq!(
        ring.decrypt("1", &new.bytes, wrap).await.unwrap().expose(),
        b"new dek"
    );
    // A legacy blob that starts with the magic by chance still opens.
    let mut lucky_nonce = [0u8; NONCE_LEN];
    lucky_nonce[..4].copy_from_slice(&crate::seal::MAGIC);
    let mut body = b"lucky".to_vec();
    legacy_key
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(lucky_nonce),
            Aad::from(wrap.aad().as_slice()),
            &mut body,
        )
        .unwrap();
    let lucky = [lucky_nonce.as_slice(), &body].concat();
    assert!(crate::seal::is_sealed(&lucky));
    assert_eq!(
        ring.decrypt("1", &lucky, wrap).await.unwrap().expose(),
        b"lucky"
    );

    // The default (predating): read under versions from before the
    // upgrade, refused under one made since (imported from version 2
    // on), where no genuine one can exist; `accept` reads both.
    let second = SecretBytes::new(vec![6u8; 32]);
    let ring =
        LocalKeyring::from_imported("k", &[material.clone(), second.clone()], Some(2)).unwrap();
    assert_eq!(
        ring.decrypt("1", &legacy, wrap).await.unwrap().expose(),
        b"old dek"
    );
    let second_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, second.expose()).unwrap());
    let mut body = b"forged".to_vec();
    second_key
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(wrap.aad().as_slice()),
            &mut body,
        )
        .unwrap();
    let made_since = [nonce.as_slice(), &body].concat();
    match ring.decrypt("2", &made_since, wrap).await {
        Err(ProviderError::InvalidCiphertext(why)) => {
            assert!(why.contains("not a wrapped key keybroker made"), "{why}")
        }
        other => panic!("a legacy wrap under a new version was read: {other:?}"),
    }
    ring.set_legacy_wraps(LegacyWraps::Accept);
    assert_eq!(
        ring.decrypt("2", &made_since, wrap).await.unwrap().expose(),
        b"forged"
    );
    // Material imported now: every version is seal-only.
    let fresh = LocalKeyring::from_material("k", std::slice::from_ref(&material)).unwrap();
    assert!(fresh.decrypt("1", &legacy, wrap).await.is_err());
}

#[tokio::test]
async fn tenant_and_context_are_bound() {
    let ring = LocalKeyring::from_material("t", &[SecretBytes::random(32).unwrap()]).unwrap();
    let c = ctx(&[("a", "1")]);
    let dek = SecretBytes::random(32).unwrap();
    let ct = ring
        .encrypt(
            &dek,
            WrapContext {
                tenant_id: "a",
                context: &c,
            },
        )
        .await
        .unwrap();
    let other_ctx = ctx(&[("a", "2")]);
    for (tenant, context) in [("b", &c), ("a", &other_ctx)] {
        let err = ring
            .decrypt(
                "1",
                &ct.bytes,
                WrapContext {
                    tenant_id: tenant,
                    context,
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::InvalidCiphertext(_)),
            "{err:?}"
        );
    }
    let err = ring
        .decrypt(
            "9",
            &ct.bytes,
            WrapContext {
                tenant_id: "a",
                context: &c,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::InvalidCiphertext(_)),
        "an unknown version is the caller's problem: {err:?}"
    );
    assert!(ring.check_version("1").is_ok());
    for forged in ["9", "0", "x", "", "1\n"] {
        let err = ring.check_version(forged).unwrap_err();
        assert!(!err.suggests_revocation(), "{forged:?}: {err:?}");
        assert!(!crate::text::has_control(&err.to_string()), "{err}");
    }
}

#[test]
fn refuses_group_readable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    LocalKeyring::open_or_create("platform", &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = LocalKeyring::open_or_create("platform", &path).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn refuses_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    std::fs::write(
        &path,
        b"{\"format\":\"keybroker-keyring-v1\",\"versions\":[]}",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = LocalKeyring::open_or_create("platform", &path).unwrap_err();
    assert!(err.to_string().contains("no key versions"), "{err}");
}

#[test]
fn private_modes() {
    for ok in [0o600, 0o400, 0o440] {
        assert!(private_mode(ok), "{ok:o}");
    }
    for bad in [0o644, 0o640, 0o660, 0o604, 0o460, 0o444, 0o606] {
        assert!(!private_mode(bad), "{bad:o}");
    }
}
