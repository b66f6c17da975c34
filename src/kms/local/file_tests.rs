//! Tests of `kms/local/file.rs`.

use super::*;
use crate::kms::local::LocalKeyring;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A software stand-in for an HSM key (the SoftHSM test in
/// tests/it/pkcs11.rs runs the real one): AES-256-GCM under a fixed key.
struct TestSeal {
    name: &'static str,
    key: aws_lc_rs::aead::LessSafeKey,
    calls: AtomicU64,
}

impl TestSeal {
    fn new(name: &'static str, byte: u8) -> Arc<Self> {
        let key =
            aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &[byte; 32]).unwrap();
        Arc::new(Self {
            name,
            key: aws_lc_rs::aead::LessSafeKey::new(key),
            calls: AtomicU64::new(0),
        })
    }
}

impl KeyringSeal for TestSeal {
    fn name(&self) -> String {
        self.name.into()
    }
    fn seal(&self, material: &[u8], aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 12];
        aws_lc_rs::rand::fill(&mut nonce).unwrap();
        let mut out = material.to_vec();
        self.key
            .seal_in_place_append_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(aad),
                &mut out,
            )
            .unwrap();
        Ok([nonce.as_slice(), &out].concat())
    }
    fn unseal(&self, sealed: &[u8], aad: &[u8]) -> Result<SecretBytes, ProviderError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let (nonce, body) = sealed.split_at(12);
        let mut buf = body.to_vec();
        let plain = self
            .key
            .open_in_place(
                aws_lc_rs::aead::Nonce::try_assume_unique_for_key(nonce).unwrap(),
                aws_lc_rs::aead::Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| ProviderError::InvalidCiphertext("authentication failed".into()))?;
        Ok(SecretBytes::new(plain.to_vec()))
    }
}

fn material(path: &Path, seal: Option<&dyn KeyringSeal>) -> Vec<(u32, Vec<u8>)> {
    load(path, seal)
        .unwrap()
        .0
        .into_iter()
        .map(|m| (m.version, m.key.expose().to_vec()))
        .collect()
}

/// Rotations racing on one file (a CLI and a server, or two CLIs) each
/// add their own version: none is lost to another's rewrite.
#[test]
fn concurrent_rotations_lose_no_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    create(&path, None).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || rotate_keyring_file(&path, None).unwrap())
        })
        .collect();
    let mut got: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (2..=9).collect::<Vec<_>>());
    let versions: Vec<u32> = material(&path, None).iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (1..=9).collect::<Vec<_>>());
}

/// Versions this build makes say they never held a legacy-layout wrap;
/// a version of a file written before says nothing (it may), and keeps
/// saying nothing through rotations and reseals.
#[test]
fn versions_made_now_are_marked_seal_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    std::fs::write(
        &path,
        format!(
            r#"{{"format":"{FILE_FORMAT}","versions":[{{"version":1,"created_unix":1,"key":"{}"}}]}}"#,
            B64.encode([3u8; KEY_LEN])
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, PermissionsExt::from_mode(0o600)).unwrap();
    rotate_keyring_file(&path, None).unwrap();
    let marks = |path: &Path, seal: Option<&dyn KeyringSeal>| -> Vec<(u32, bool)> {
        load(path, seal)
            .unwrap()
            .0
            .iter()
            .map(|m| (m.version, m.seal_only))
            .collect()
    };
    assert_eq!(marks(&path, None), [(1, false), (2, true)]);
    let seal = TestSeal::new("hsm-a", 1);
    reseal_keyring_file(&path, None, Some(seal.as_ref())).unwrap();
    assert_eq!(marks(&path, Some(seal.as_ref())), [(1, false), (2, true)]);
    let fresh = dir.path().join("fresh.json");
    create(&fresh, None).unwrap();
    assert_eq!(marks(&fresh, None), [(1, true)]);
}

#[test]
fn sealed_files_hold_no_key_and_need_their_seal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    let hsm = TestSeal::new("pkcs11:token=t;object=platform", 1);
    let ring = LocalKeyring::open_or_create_sealed("platform", &path, Some(hsm.clone())).unwrap();
    assert_eq!(ring.rotate().unwrap(), 2);
    let sealed = material(&path, Some(hsm.as_ref()));
    assert_eq!(sealed.len(), 2);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(SEALED_FORMAT) && text.contains("pkcs11:token=t;object=platform"));
    for (_, key) in &sealed {
        assert!(
            !text.contains(&B64.encode(key)),
            "a version is in the clear"
        );
    }

    // Without the seal, under another key, or sealed and read plainly:
    // refused with the fix, never misread.
    let err = LocalKeyring::open_or_create("platform", &path).unwrap_err();
    assert!(
        err.to_string()
            .contains("--platform-key pkcs11:token=t;object=platform"),
        "{err}"
    );
    let other = TestSeal::new("pkcs11:token=t;object=other", 2);
    let err =
        LocalKeyring::open_or_create_sealed("platform", &path, Some(other.clone())).unwrap_err();
    assert!(err.to_string().contains("not by the configured"), "{err}");

    // A version moved to another number fails its AAD.
    let mut file: KeyringFile = serde_json::from_str(&text).unwrap();
    file.versions[1].version = 7;
    write_atomically(&path, &file).unwrap();
    let err = load(&path, Some(hsm.as_ref())).err().unwrap();
    assert!(
        err.to_string().contains("version 7 could not be unsealed"),
        "{err}"
    );
}

#[test]
fn reseal_moves_a_plain_keyring_into_the_hsm_and_out_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.json");
    LocalKeyring::open_or_create("platform", &path).unwrap();
    rotate_keyring_file(&path, None).unwrap();
    let plain = material(&path, None);

    let hsm = TestSeal::new("pkcs11:token=t;object=platform", 1);
    let err =
        LocalKeyring::open_or_create_sealed("platform", &path, Some(hsm.clone())).unwrap_err();
    assert!(err.to_string().contains("keybroker keyring seal"), "{err}");

    assert_eq!(
        reseal_keyring_file(&path, None, Some(hsm.as_ref())).unwrap(),
        2
    );
    assert_eq!(material(&path, Some(hsm.as_ref())), plain);
    let other = TestSeal::new("pkcs11:token=t;object=next", 3);
    reseal_keyring_file(&path, Some(hsm.as_ref()), Some(other.as_ref())).unwrap();
    assert_eq!(material(&path, Some(other.as_ref())), plain);
    reseal_keyring_file(&path, Some(other.as_ref()), None).unwrap();
    assert_eq!(material(&path, None), plain);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Reading with a wrong seal never rewrites the file.
    let before = std::fs::read(&path).unwrap();
    assert!(reseal_keyring_file(&path, Some(hsm.as_ref()), None).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
