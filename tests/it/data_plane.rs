//! The data plane through the generated client against a real server.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keybroker::proto::{self, WrappedKey};
use prost::Message;
use tonic::Code;

use keybroker::registry::Registry as _;
use keybroker::registry::sql::SqlRegistry;

use crate::common::{SlowKeyring, TestServer, ctx, generate_req, test_config, unwrap_req};

#[tokio::test]
async fn every_rpc_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let c = [("table", "orders"), ("region", "eu")];

    let generated = client
        .generate_data_key(generate_req("acme", &c))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generated.plaintext.len(), 32);
    let key = generated.key.clone().unwrap();
    assert_eq!(key.key_binding, "platform");
    assert_eq!(key.provider(), proto::Provider::Local);
    // A tenant nobody registered is registered by its first wrap, and its
    // DEKs are sealed under a tenant key of its own (wrapped by the
    // platform key), so deleting it would shred them.
    assert_eq!(key.provider_key_version, "tenant-key/1");

    // The wrapped key is a WrappedKey message any SDK can inspect.
    let envelope = WrappedKey::decode(generated.wrapped_key.as_slice()).unwrap();
    assert_eq!(envelope.format_version, 4);
    assert_eq!(envelope.tenant_id, "acme");
    assert_eq!(
        (envelope.tenant_key_version, envelope.tenant_incarnation),
        (1, 1)
    );
    assert!(
        !envelope
            .ciphertext
            .windows(32)
            .any(|w| w == &generated.plaintext[..])
    );

    let unwrapped = client
        .unwrap_key(unwrap_req("acme", &c, &generated.wrapped_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwrapped.plaintext, generated.plaintext);
    assert!(!unwrapped.rewrap_recommended);

    let aes128 = client
        .generate_data_key(proto::GenerateDataKeyRequest {
            key_spec: proto::KeySpec::Aes128.into(),
            ..generate_req("acme", &[])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aes128.plaintext.len(), 16);

    let my_dek = vec![0x5a; 24];
    let wrapped = client
        .wrap_key(proto::WrapKeyRequest {
            tenant_id: "acme".into(),
            context: ctx(&c),
            plaintext: my_dek.clone(),
            justification: None,
        })
        .await
        .unwrap()
        .into_inner();
    let back = client
        .unwrap_key(unwrap_req("acme", &c, &wrapped.wrapped_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, my_dek);

    let rewrapped = client
        .rewrap_key(proto::RewrapKeyRequest {
            tenant_id: "acme".into(),
            context: ctx(&c),
            wrapped_key: wrapped.wrapped_key.clone(),
            justification: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rewrapped.wrapped_key, wrapped.wrapped_key);
    assert_eq!(rewrapped.previous_key.unwrap().key_binding, "platform");
    let back = client
        .unwrap_key(unwrap_req("acme", &c, &rewrapped.wrapped_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, my_dek);

    let described = client
        .describe_key(proto::DescribeKeyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(described.uses_platform_key);
    assert_eq!(described.bindings.len(), 1);
    assert_eq!(described.bindings[0].state(), proto::KeyState::Active);
    assert!(described.bindings[0].primary);
    assert_eq!(described.bindings[0].current_key_version, "1");
    server.stop().await;
}

#[tokio::test]
async fn keyring_rotation_keeps_old_keys_readable() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let keyring_path = config.platform_keyring_path();
    let server = TestServer::start(config).await;
    let mut client = server.client().await;

    let old = client
        .generate_data_key(generate_req("acme", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        old.key.as_ref().unwrap().provider_key_version,
        "tenant-key/1"
    );

    // What `keybroker keyring rotate` does, while the server runs.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["keyring", "rotate", "--data-dir"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(keyring_path.exists());

    // The server picks the new version up within its reload interval.
    let mut newest = String::new();
    for _ in 0..50 {
        let d = client
            .describe_key(proto::DescribeKeyRequest {
                tenant_id: "acme".into(),
            })
            .await
            .unwrap()
            .into_inner();
        newest = d.primary.unwrap().provider_key_version;
        if newest == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(newest, "2", "rotation not picked up");

    // New tenant keys are wrapped under the new version; those wrapped
    // before keep theirs, so every DEK sealed under them keeps unwrapping.
    let new = client
        .generate_data_key(generate_req("globex", &[]))
        .await
        .unwrap()
        .into_inner();
    for (tenant, dek) in [("acme", &old), ("globex", &new)] {
        let back = client
            .unwrap_key(unwrap_req(tenant, &[], &dek.wrapped_key))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(back.plaintext, dek.plaintext);
        assert!(!back.rewrap_recommended, "{tenant}");
    }
    let wrapped_under = |tenant: &'static str| {
        let dir = dir.path().to_owned();
        async move {
            let registry = SqlRegistry::open_sqlite(&dir.join("registry.db"))
                .await
                .unwrap();
            let versions = registry.tenant_keys(tenant).await.unwrap();
            registry.close().await;
            versions
                .iter()
                .map(|v| (v.binding.clone(), v.provider_key_version.clone()))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        wrapped_under("acme").await,
        [("platform".into(), "1".into())]
    );
    assert_eq!(
        wrapped_under("globex").await,
        [("platform".into(), "2".into())]
    );
    server.stop().await;

    // A restart on the same data dir reads both versions.
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    for (tenant, dek) in [("acme", &old), ("globex", &new)] {
        let back = client
            .unwrap_key(unwrap_req(tenant, &[], &dek.wrapped_key))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(back.plaintext, dek.plaintext);
    }
    server.stop().await;
}

#[tokio::test]
async fn cross_tenant_and_wrong_context_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let b = client
        .generate_data_key(generate_req("tenant-b", &[("t", "1")]))
        .await
        .unwrap()
        .into_inner();
    let encrypts = server.encrypt_calls();
    let decrypts = server.decrypt_calls();

    let err = client
        .unwrap_key(unwrap_req("tenant-a", &[("t", "1")], &b.wrapped_key))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("different tenant"),
        "{}",
        err.message()
    );
    let err = client
        .rewrap_key(proto::RewrapKeyRequest {
            tenant_id: "tenant-a".into(),
            context: ctx(&[("t", "1")]),
            wrapped_key: b.wrapped_key.clone(),
            justification: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        server.decrypt_calls(),
        decrypts,
        "a refused tenant cost a provider call"
    );
    assert_eq!(server.encrypt_calls(), encrypts);

    // Forging the tenant inside the envelope gets nothing. For a tenant
    // that was never registered it names an incarnation the tenant does
    // not have: refused before any key is touched.
    let mut forged = WrappedKey::decode(b.wrapped_key.as_slice()).unwrap();
    forged.tenant_id = "tenant-a".into();
    let err = client
        .unwrap_key(unwrap_req(
            "tenant-a",
            &[("t", "1")],
            &forged.encode_to_vec(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // For a registered one (same incarnation number) it fails
    // authentication: the tenant is bound into the AAD, not just written
    // beside the ciphertext.
    client
        .generate_data_key(generate_req("tenant-a", &[]))
        .await
        .unwrap();
    let err = client
        .unwrap_key(unwrap_req(
            "tenant-a",
            &[("t", "1")],
            &forged.encode_to_vec(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Wrong context: INVALID_ARGUMENT (documented in broker.proto).
    for context in [&[("t", "2")][..], &[][..], &[("t", "1"), ("u", "1")][..]] {
        let err = client
            .unwrap_key(unwrap_req("tenant-b", context, &b.wrapped_key))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{context:?}: {err:?}");
    }
    // The right one still works after all that.
    let ok = client
        .unwrap_key(unwrap_req("tenant-b", &[("t", "1")], &b.wrapped_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.plaintext, b.plaintext);
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_code_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let mut client = server.client().await;
    let good = client
        .generate_data_key(generate_req("acme", &[]))
        .await
        .unwrap()
        .into_inner();
    let w = &good.wrapped_key;

    let mut tampered = WrappedKey::decode(w.as_slice()).unwrap();
    let last = tampered.ciphertext.len() - 1;
    tampered.ciphertext[last] ^= 1;
    let tampered_ct = tampered.encode_to_vec();
    let mut unknown_version = WrappedKey::decode(w.as_slice()).unwrap();
    unknown_version.format_version = 9;
    let mut trailing = w.clone();
    trailing.extend_from_slice(&[0x78, 0x01]);
    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "tampered ciphertext",
            tampered_ct,
            Code::InvalidArgument,
            "altered",
        ),
        (
            "truncated",
            w[..w.len() / 2].to_vec(),
            Code::InvalidArgument,
            "wrapped_key",
        ),
        (
            "one byte short",
            w[..w.len() - 1].to_vec(),
            Code::InvalidArgument,
            "wrapped_key",
        ),
        ("empty", vec![], Code::InvalidArgument, "empty"),
        (
            "unknown version",
            unknown_version.encode_to_vec(),
            Code::InvalidArgument,
            "version 9",
        ),
        (
            "trailing field",
            trailing,
            Code::InvalidArgument,
            "canonical",
        ),
        (
            "garbage",
            vec![0xff; 100],
            Code::InvalidArgument,
            "not a keybroker wrapped key",
        ),
        (
            "over the envelope cap",
            vec![0x0a; 20 * 1024],
            Code::InvalidArgument,
            "maximum",
        ),
        // Over the 64 KiB message limit: refused by the gRPC decoder.
        (
            "over the message limit",
            vec![0; 70 * 1024],
            Code::OutOfRange,
            "too large",
        ),
    ];
    let decrypts_before = server.decrypt_calls();
    for (name, wrapped, code, needle) in cases {
        let err = client
            .unwrap_key(unwrap_req("acme", &[], &wrapped))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{name}: {:?}",
            err.message()
        );
    }
    // None reached a provider: the tampered ciphertext (a well-formed
    // envelope) fails its seal under the tenant key cached at its mint.
    assert_eq!(server.decrypt_calls() - decrypts_before, 0);

    let bad_requests: Vec<(&str, proto::WrapKeyRequest)> = vec![
        (
            "empty tenant",
            proto::WrapKeyRequest {
                tenant_id: "".into(),
                context: ctx(&[]),
                plaintext: vec![1; 32],
                justification: None,
            },
        ),
        (
            "bad tenant",
            proto::WrapKeyRequest {
                tenant_id: "a/b".into(),
                context: ctx(&[]),
                plaintext: vec![1; 32],
                justification: None,
            },
        ),
        (
            "empty plaintext",
            proto::WrapKeyRequest {
                tenant_id: "acme".into(),
                context: ctx(&[]),
                plaintext: vec![],
                justification: None,
            },
        ),
        (
            "huge plaintext",
            proto::WrapKeyRequest {
                tenant_id: "acme".into(),
                context: ctx(&[]),
                plaintext: vec![1; 4097],
                justification: None,
            },
        ),
        (
            "reserved context",
            proto::WrapKeyRequest {
                tenant_id: "acme".into(),
                context: ctx(&[("keybroker:tenant", "x")]),
                plaintext: vec![1; 32],
                justification: None,
            },
        ),
    ];
    for (name, req) in bad_requests {
        let err = client.wrap_key(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
    }
    let err = client
        .generate_data_key(proto::GenerateDataKeyRequest {
            key_spec: 42,
            ..generate_req("acme", &[])
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("key_spec"));

    // A method the service does not have, and a service the server does
    // not have: UNIMPLEMENTED either way (the first answered by the data
    // plane's own dispatch, the second by tonic's router).
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    for path in [
        "/keybroker.v1.KeyBroker/NoSuchMethod",
        "/keybroker.v9.NoSuchService/UnwrapKey",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<proto::DescribeKeyRequest, proto::DescribeKeyResponse, _>(
                tonic::Request::new(proto::DescribeKeyRequest {
                    tenant_id: "acme".into(),
                }),
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{path}: {err:?}");
    }

    // Still serving, and the good key still unwraps.
    let back = client
        .unwrap_key(unwrap_req("acme", &[], w))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.plaintext, good.plaintext);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_cold_unwraps_make_one_provider_call() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(SlowKeyring::new(Duration::from_millis(100)));
    let server = TestServer::start_with_provider(test_config(dir.path()), provider.clone()).await;
    let mut client = server.client().await;
    let generated = client
        .generate_data_key(generate_req("acme", &[("f", "1")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(provider.decrypts.load(Ordering::SeqCst), 0);

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let mut client = client.clone();
            let wrapped = generated.wrapped_key.clone();
            tokio::spawn(async move {
                client
                    .unwrap_key(unwrap_req("acme", &[("f", "1")], &wrapped))
                    .await
                    .map(|r| r.into_inner().plaintext)
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), generated.plaintext);
    }
    assert_eq!(provider.decrypts.load(Ordering::SeqCst), 1);
    let stats = server.broker.cache().stats().snapshot();
    assert_eq!(stats.misses, 1);
    assert_eq!(stats.hits, 199);

    // Another context is another cache entry: one more call.
    let other = client
        .generate_data_key(generate_req("acme", &[("f", "2")]))
        .await
        .unwrap()
        .into_inner();
    client
        .unwrap_key(unwrap_req("acme", &[("f", "2")], &other.wrapped_key))
        .await
        .unwrap();
    assert_eq!(provider.decrypts.load(Ordering::SeqCst), 2);
    server.stop().await;
}

#[tokio::test]
async fn cache_expires_after_ttl_and_purges_by_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.cache.ttl = Duration::from_millis(300);
    config.cache.tti = Duration::from_millis(300);
    // DEKs wrapped directly by a counting provider: each load of a DEK is
    // one provider call.
    let provider = Arc::new(SlowKeyring::new(Duration::ZERO));
    let server = TestServer::start_with_provider(config, Arc::clone(&provider) as _).await;
    let decrypts = || provider.decrypts.load(Ordering::SeqCst);
    let mut client = server.client().await;
    let a = client
        .generate_data_key(generate_req("a", &[]))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .generate_data_key(generate_req("b", &[]))
        .await
        .unwrap()
        .into_inner();

    let unwrap = |tenant: &'static str, wrapped: Vec<u8>| {
        let mut client = client.clone();
        async move {
            client
                .unwrap_key(unwrap_req(tenant, &[], &wrapped))
                .await
                .unwrap()
        }
    };
    unwrap("a", a.wrapped_key.clone()).await;
    unwrap("a", a.wrapped_key.clone()).await;
    assert_eq!(decrypts(), 1, "second unwrap should hit");

    tokio::time::sleep(Duration::from_millis(450)).await;
    unwrap("a", a.wrapped_key.clone()).await;
    assert_eq!(decrypts(), 2, "entry should have expired");

    unwrap("b", b.wrapped_key.clone()).await;
    assert_eq!(decrypts(), 3);
    server.broker.cache().purge_tenant("a").await;
    unwrap("b", b.wrapped_key.clone()).await;
    assert_eq!(decrypts(), 3, "tenant b's entry must survive a purge of a");
    unwrap("a", a.wrapped_key.clone()).await;
    assert_eq!(decrypts(), 4, "tenant a's entry must be gone");
    server.stop().await;
}

#[tokio::test]
async fn in_flight_rpcs_complete_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(SlowKeyring::new(Duration::from_millis(400)));
    let server = TestServer::start_with_provider(test_config(dir.path()), provider).await;
    let client = server.client().await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .generate_data_key(generate_req(&format!("t{i}"), &[]))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // All 20 are inside the provider now; stop the server under them.
    let stopped = tokio::spawn(server.stop());
    for task in tasks {
        let resp = task
            .await
            .unwrap()
            .expect("in-flight RPC failed during shutdown");
        assert_eq!(resp.into_inner().plaintext.len(), 32);
    }
    stopped.await.unwrap();
}
