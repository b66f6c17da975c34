//! Wrapped key import (BYOK): material wrapped by the real `openssl` binary
//! to the one-time public key of GetImportParameters, with both wrappings;
//! every way a token or a wrapping can be wrong is refused with what to do,
//! and nothing is stored.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keybroker::proto::{self, key_admin_client::KeyAdminClient};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::*;

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is needed for these tests (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hex_of(path: &Path) -> String {
    std::fs::read(path)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn parameters(
    admin: &mut KeyAdminClient<Channel>,
    name: &str,
    algorithm: proto::WrappingAlgorithm,
    bits: u32,
) -> proto::GetImportParametersResponse {
    admin
        .get_import_parameters(proto::GetImportParametersRequest {
            tenant_id: "acme".into(),
            name: name.into(),
            wrapping_algorithm: algorithm.into(),
            wrapping_key_bits: bits,
        })
        .await
        .unwrap()
        .into_inner()
}

/// What a customer runs: `material` wrapped with openssl to the PEM key of
/// `params` (docs/keys.md shows the same commands).
fn wrap_with_openssl(
    dir: &Path,
    params: &proto::GetImportParametersResponse,
    material: &Path,
) -> Vec<u8> {
    let public = dir.join("public.pem");
    std::fs::write(&public, &params.public_key_pem).unwrap();
    let oaep = |input: &Path, output: &Path| {
        openssl(&[
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            public.to_str().unwrap(),
            "-in",
            input.to_str().unwrap(),
            "-out",
            output.to_str().unwrap(),
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
        ]);
    };
    let wrapped = dir.join("wrapped.bin");
    match params.wrapping_algorithm() {
        proto::WrappingAlgorithm::RsaAesKeyWrapSha256 => {
            let ephemeral = dir.join("ephemeral.bin");
            openssl(&["rand", "-out", ephemeral.to_str().unwrap(), "32"]);
            let kwp = dir.join("kwp.bin");
            openssl(&[
                "enc",
                "-id-aes256-wrap-pad",
                "-K",
                &hex_of(&ephemeral),
                "-iv",
                "A65959A6",
                "-in",
                material.to_str().unwrap(),
                "-out",
                kwp.to_str().unwrap(),
            ]);
            let rsa = dir.join("rsa.bin");
            oaep(&ephemeral, &rsa);
            let mut bytes = std::fs::read(&rsa).unwrap();
            bytes.extend(std::fs::read(&kwp).unwrap());
            std::fs::write(&wrapped, &bytes).unwrap();
        }
        _ => oaep(material, &wrapped),
    }
    std::fs::read(&wrapped).unwrap()
}

async fn import_wrapped(
    admin: &mut KeyAdminClient<Channel>,
    name: &str,
    token: &str,
    wrapped: Vec<u8>,
) -> Result<proto::KeyBinding, tonic::Status> {
    admin
        .import_key_material(proto::ImportKeyMaterialRequest {
            tenant_id: "acme".into(),
            name: name.into(),
            wrapped_key_material: wrapped,
            import_token: token.into(),
            make_primary: true,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().key.unwrap())
}

async fn key_names(admin: &mut KeyAdminClient<Channel>) -> Vec<String> {
    admin
        .list_keys(proto::ListKeysRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_material_from_openssl_imports_once_and_everything_else_is_refused() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.control.import_token_ttl = Duration::from_secs(4);
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    create_tenant(&mut admin, "acme", proto::KeyPolicy::Unspecified).await;

    for (name, algorithm, bits) in [
        ("byok-oaep", proto::WrappingAlgorithm::RsaesOaepSha256, 3072),
        (
            "byok-kwp",
            proto::WrappingAlgorithm::RsaAesKeyWrapSha256,
            4096,
        ),
    ] {
        let work = tempfile::tempdir().unwrap();
        let material = work.path().join("material.bin");
        openssl(&["rand", "-out", material.to_str().unwrap(), "32"]);
        let params = parameters(&mut admin, name, algorithm, bits).await;
        assert!(
            params
                .public_key_pem
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        assert_eq!(params.wrapping_algorithm(), algorithm);
        let wrapped = wrap_with_openssl(work.path(), &params, &material);
        let key = import_wrapped(&mut admin, name, &params.import_token, wrapped.clone())
            .await
            .unwrap();
        assert_eq!(key.provider(), proto::Provider::Local);
        // The key is the material: the same bytes imported raw are refused
        // as a duplicate, and it wraps and unwraps.
        let raw =
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(&material).unwrap());
        let dup = admin
            .import_key_material(proto::ImportKeyMaterialRequest {
                tenant_id: "acme".into(),
                name: format!("{name}-raw"),
                key_material_base64: raw,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            dup.message().contains(&format!(
                "already imported for tenant 'acme' as key '{name}'"
            )),
            "{}",
            dup.message()
        );
        let dek = generate(&mut broker, "acme", &[]).await.unwrap();
        assert_eq!(dek.key.as_ref().unwrap().key_binding, name);
        assert_eq!(
            unwrap(&mut broker, "acme", &[], &dek.wrapped_key)
                .await
                .unwrap()
                .plaintext,
            dek.plaintext
        );
        // The token imports once.
        let again = import_wrapped(
            &mut admin,
            &format!("{name}-2"),
            &params.import_token,
            wrapped,
        )
        .await
        .unwrap_err();
        assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
        assert!(
            again.message().contains("already used"),
            "{}",
            again.message()
        );
    }

    let refused = |status: &tonic::Status, code: Code, says: &str| {
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(says), "{}", status.message());
    };
    let work = tempfile::tempdir().unwrap();
    let material = work.path().join("material.bin");
    openssl(&["rand", "-out", material.to_str().unwrap(), "32"]);

    // One token, two imports at once: exactly one gets it.
    let race = parameters(
        &mut admin,
        "race",
        proto::WrappingAlgorithm::RsaesOaepSha256,
        0,
    )
    .await;
    let wrapped = wrap_with_openssl(work.path(), &race, &material);
    let (mut a, mut b) = (admin.clone(), admin.clone());
    let (first, second) = tokio::join!(
        import_wrapped(&mut a, "race", &race.import_token, wrapped.clone()),
        import_wrapped(&mut b, "race", &race.import_token, wrapped),
    );
    assert_eq!(
        u8::from(first.is_ok()) + u8::from(second.is_ok()),
        1,
        "{first:?} {second:?}"
    );

    // Wrapped with the other algorithm than the token's.
    let oaep = parameters(
        &mut admin,
        "k",
        proto::WrappingAlgorithm::RsaesOaepSha256,
        0,
    )
    .await;
    let mut kwp_shaped = oaep.clone();
    kwp_shaped.wrapping_algorithm = proto::WrappingAlgorithm::RsaAesKeyWrapSha256.into();
    let wrong = wrap_with_openssl(work.path(), &kwp_shaped, &material);
    let err = import_wrapped(&mut admin, "k", &oaep.import_token, wrong)
        .await
        .unwrap_err();
    refused(&err, Code::InvalidArgument, "is 424 bytes");
    // ...which used the token up.
    let err = import_wrapped(&mut admin, "k", &oaep.import_token, vec![0; 384])
        .await
        .unwrap_err();
    refused(&err, Code::FailedPrecondition, "already used");

    // Material of the wrong size.
    let short = work.path().join("short.bin");
    openssl(&["rand", "-out", short.to_str().unwrap(), "16"]);
    let params = parameters(
        &mut admin,
        "k",
        proto::WrappingAlgorithm::RsaesOaepSha256,
        0,
    )
    .await;
    let wrapped = wrap_with_openssl(work.path(), &params, &short);
    let err = import_wrapped(&mut admin, "k", &params.import_token, wrapped)
        .await
        .unwrap_err();
    refused(&err, Code::InvalidArgument, "exactly 32 bytes");

    // Wrapped to another token's key.
    let mine = parameters(
        &mut admin,
        "k",
        proto::WrappingAlgorithm::RsaesOaepSha256,
        0,
    )
    .await;
    let theirs = parameters(
        &mut admin,
        "k",
        proto::WrappingAlgorithm::RsaesOaepSha256,
        0,
    )
    .await;
    let wrapped = wrap_with_openssl(work.path(), &theirs, &material);
    let err = import_wrapped(&mut admin, "k", &mine.import_token, wrapped)
        .await
        .unwrap_err();
    refused(
        &err,
        Code::InvalidArgument,
        "does not decrypt with this import token's key",
    );

    // A token issued for another key name.
    let other = parameters(
        &mut admin,
        "other",
        proto::WrappingAlgorithm::RsaesOaepSha256,
        0,
    )
    .await;
    let wrapped = wrap_with_openssl(work.path(), &other, &material);
    let err = import_wrapped(&mut admin, "k", &other.import_token, wrapped)
        .await
        .unwrap_err();
    refused(&err, Code::FailedPrecondition, "issued for another key");

    // A token never issued; raw and wrapped at once; a bad key size.
    let err = import_wrapped(&mut admin, "k", "kbimp-nope", vec![1; 384])
        .await
        .unwrap_err();
    refused(&err, Code::InvalidArgument, "not one this service issued");
    let both = admin
        .import_key_material(proto::ImportKeyMaterialRequest {
            tenant_id: "acme".into(),
            name: "k".into(),
            key_material_base64: random_material(),
            import_token: mine.import_token.clone(),
            wrapped_key_material: vec![1; 384],
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&both, Code::InvalidArgument, "give either");
    let err = admin
        .get_import_parameters(proto::GetImportParametersRequest {
            tenant_id: "acme".into(),
            name: "k".into(),
            wrapping_algorithm: 0,
            wrapping_key_bits: 2048,
        })
        .await
        .unwrap_err();
    refused(&err, Code::InvalidArgument, "use 3072 or 4096");

    // An expired token.
    let late = parameters(
        &mut admin,
        "k",
        proto::WrappingAlgorithm::RsaesOaepSha256,
        0,
    )
    .await;
    let wrapped = wrap_with_openssl(work.path(), &late, &material);
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let err = import_wrapped(&mut admin, "k", &late.import_token, wrapped)
        .await
        .unwrap_err();
    refused(&err, Code::FailedPrecondition, "expired at");

    // Nothing of the refused imports was stored.
    let mut names = key_names(&mut admin).await;
    names.sort();
    assert_eq!(names, vec!["byok-kwp", "byok-oaep", "race"]);

    // The CLI: parameters to a file, material wrapped on the client side.
    let params_file = work.path().join("params.json");
    let url = server.url();
    let written = crate::batch::cli_json(
        [
            "admin",
            "--server",
            &url,
            "key",
            "import-parameters",
            "--tenant",
            "acme",
            "--name",
            "cli",
            "--wrapping",
            "rsa-aes-key-wrap-sha256",
            "--out",
            params_file.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        String::new(),
    )
    .await;
    assert_eq!(written["wrapping_algorithm"], "RSA_AES_KEY_WRAP_SHA_256");
    let imported = crate::batch::cli_json(
        [
            "admin",
            "--server",
            &url,
            "key",
            "import",
            "--tenant",
            "acme",
            "--name",
            "cli",
            "--wrap-with",
            params_file.to_str().unwrap(),
            "--material-file",
            "-",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        random_material(),
    )
    .await;
    assert_eq!(imported["name"], "cli", "{imported}");
    server.stop().await;
}
