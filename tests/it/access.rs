//! Access justifications: the platform's authorization policy decides which
//! reasons a caller may claim, the tenant's access policy which it accepts;
//! both refuse before any key is touched, and every record names the reason.

use std::time::{Duration, Instant};

use keybroker::audit::{AuditSettings, AuditTarget};
use keybroker::proto::{
    self, key_admin_client::KeyAdminClient, key_broker_client::KeyBrokerClient,
};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::aws_support::{Moto, link_request};
use crate::common::*;

const TENANT: &str = "acme";

fn justified(reason: proto::AccessReason, detail: &str) -> Option<proto::AccessJustification> {
    Some(proto::AccessJustification {
        reason: reason.into(),
        detail: detail.into(),
    })
}

async fn unwrap_for(
    broker: &mut KeyBrokerClient<Channel>,
    wrapped: &[u8],
    justification: Option<proto::AccessJustification>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut req = unwrap_req(TENANT, &[], wrapped);
    req.justification = justification;
    broker
        .unwrap_key(req)
        .await
        .map(|r| r.into_inner().plaintext.to_vec())
}

/// The ErrorInfo reason of a refusal, after its code.
fn refused(status: &tonic::Status, code: tonic::Code) -> String {
    assert_eq!(status.code(), code, "{status:?}");
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

async fn set_policy(
    admin: &mut KeyAdminClient<Channel>,
    require_reason: bool,
    allowed: &[proto::AccessReason],
) -> Result<proto::Tenant, tonic::Status> {
    admin
        .set_access_policy(proto::SetAccessPolicyRequest {
            tenant_id: TENANT.into(),
            access_policy: Some(proto::AccessPolicy {
                require_reason,
                allowed_reasons: allowed.iter().map(|r| *r as i32).collect(),
            }),
        })
        .await
        .map(|r| r.into_inner().tenant.unwrap())
}

/// (encrypt calls, decrypt calls, cache hits, cache misses) of a server.
fn touched(server: &TestServer) -> (u64, u64, u64, u64) {
    let cache = server.broker.cache().stats().snapshot();
    (
        server.encrypt_calls(),
        server.decrypt_calls(),
        cache.hits,
        cache.misses,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasons_are_claimed_by_grant_and_accepted_by_the_tenant_before_any_key_is_touched() {
    use proto::AccessReason as R;
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.log");
    let mut config = test_config(dir.path());
    config.aws = moto.settings();
    config.audit = AuditSettings {
        target: AuditTarget::File(audit_path.clone()),
        ..AuditSettings::default()
    };
    // This caller may claim no reason, customer_initiated, migration and
    // customer_support; never legal_request.
    config.server.authz_policy = Some(crate::security::write_policy(
        dir.path(),
        r#"
        [[allow]]
        identities = ["unauthenticated"]
        methods = ["*"]
        tenants = ["*"]
        reasons = ["none", "customer_initiated", "migration", "customer_support"]
        "#,
    ));
    let server = TestServer::start(config).await;
    let mut admin = admin_client(&server).await;
    let mut broker = server.client().await;
    create_tenant(&mut admin, TENANT, proto::KeyPolicy::Unspecified).await;
    admin
        .link_key(link_request("cmk", &key_arn, &[], false))
        .await
        .unwrap();
    let mut req = generate_req(TENANT, &[]);
    req.justification = justified(R::CustomerInitiated, "");
    let dek = broker.generate_data_key(req).await.unwrap().into_inner();
    let warm = unwrap_for(&mut broker, &dek.wrapped_key, None)
        .await
        .unwrap();
    assert_eq!(warm, dek.plaintext.to_vec());
    let before = touched(&server);

    // 1. A reason the platform does not let this caller claim.
    let err = unwrap_for(
        &mut broker,
        &dek.wrapped_key,
        justified(R::LegalRequest, "LR-9"),
    )
    .await
    .unwrap_err();
    assert_eq!(
        refused(&err, tonic::Code::PermissionDenied),
        "REASON_NOT_GRANTED"
    );
    assert!(err.message().contains("legal_request"), "{}", err.message());

    // 2. Malformed justifications: INVALID_ARGUMENT, saying what to send.
    for (justification, says) in [
        (justified(R::CustomerSupport, ""), "needs a detail"),
        (
            Some(proto::AccessJustification {
                reason: 42,
                detail: String::new(),
            }),
            "not an AccessReason",
        ),
        (justified(R::Unspecified, "x"), "without a reason"),
        (justified(R::Migration, &"x".repeat(257)), "at most 256"),
        (justified(R::Migration, "a\u{7}b"), "control characters"),
    ] {
        let err = unwrap_for(&mut broker, &dek.wrapped_key, justification)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }

    // 3. The customer accepts customer_initiated and customer_support only,
    // and requires a reason.
    let bad = admin
        .set_access_policy(proto::SetAccessPolicyRequest {
            tenant_id: TENANT.into(),
            access_policy: Some(proto::AccessPolicy {
                require_reason: true,
                allowed_reasons: vec![R::Unspecified as i32],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    let tenant = set_policy(
        &mut admin,
        true,
        &[
            R::CustomerSupport,
            R::CustomerInitiated,
            R::CustomerInitiated,
        ],
    )
    .await
    .unwrap();
    let policy = tenant.access_policy.unwrap();
    assert!(policy.require_reason);
    assert_eq!(
        policy.allowed_reasons,
        vec![R::CustomerInitiated as i32, R::CustomerSupport as i32]
    );

    let err = unwrap_for(&mut broker, &dek.wrapped_key, None)
        .await
        .unwrap_err();
    assert_eq!(
        refused(&err, tonic::Code::PermissionDenied),
        "ACCESS_REASON_REFUSED"
    );
    assert!(
        err.message().contains("reason none") && err.message().contains("requires a reason"),
        "{}",
        err.message()
    );
    let err = unwrap_for(&mut broker, &dek.wrapped_key, justified(R::Migration, ""))
        .await
        .unwrap_err();
    assert_eq!(
        refused(&err, tonic::Code::PermissionDenied),
        "ACCESS_REASON_REFUSED"
    );
    assert!(
        err.message()
            .contains("accepts customer_initiated, customer_support"),
        "{}",
        err.message()
    );
    // Every method that uses a key, single and batch.
    let mut generate = generate_req(TENANT, &[]);
    generate.justification = justified(R::Migration, "");
    let err = broker.generate_data_key(generate).await.unwrap_err();
    assert_eq!(
        refused(&err, tonic::Code::PermissionDenied),
        "ACCESS_REASON_REFUSED"
    );
    let err = broker
        .wrap_key(proto::WrapKeyRequest {
            tenant_id: TENANT.into(),
            context: ctx(&[]),
            plaintext: vec![7; 32],
            justification: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused(&err, tonic::Code::PermissionDenied),
        "ACCESS_REASON_REFUSED"
    );
    let err = rewrap(&mut broker, TENANT, &[], &dek.wrapped_key)
        .await
        .unwrap_err();
    assert_eq!(
        refused(&err, tonic::Code::PermissionDenied),
        "ACCESS_REASON_REFUSED"
    );
    let items = [
        justified(R::CustomerInitiated, ""),
        justified(R::Migration, ""),
        None,
        justified(R::LegalRequest, "LR-9"),
    ]
    .into_iter()
    .map(|justification| {
        let mut item = unwrap_req(TENANT, &[], &dek.wrapped_key);
        item.justification = justification;
        item
    })
    .collect();
    let results = broker
        .batch_unwrap_key(proto::BatchUnwrapKeyRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<i32> = results
        .iter()
        .map(|r| r.status.as_ref().map_or(-1, |s| s.code))
        .collect();
    assert_eq!(
        codes,
        vec![
            tonic::Code::Ok as i32,
            tonic::Code::PermissionDenied as i32,
            tonic::Code::PermissionDenied as i32,
            tonic::Code::PermissionDenied as i32,
        ]
    );
    assert_eq!(
        results[0].response.as_ref().unwrap().plaintext,
        dek.plaintext
    );

    // Nothing refused touched a key: no provider call, no cache read but
    // the batch's one accepted item (a hit).
    let (encrypts, decrypts, hits, misses) = before;
    assert_eq!(touched(&server), (encrypts, decrypts, hits + 1, misses));

    // 4. An accepted reason with its detail is served.
    let served = unwrap_for(
        &mut broker,
        &dek.wrapped_key,
        justified(R::CustomerSupport, "TICKET-7"),
    )
    .await
    .unwrap();
    assert_eq!(served, dek.plaintext.to_vec());

    // 5. Back to the default: every reason, none required.
    let tenant = set_policy(&mut admin, false, &[]).await.unwrap();
    assert_eq!(
        tenant.access_policy.unwrap(),
        proto::AccessPolicy::default()
    );
    unwrap_for(&mut broker, &dek.wrapped_key, None)
        .await
        .unwrap();

    // Every record names the reason the call gave, and its detail.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let unwraps: Vec<(&str, &str, Option<&str>)> = records
        .iter()
        .filter(|r| r["method"] == "keybroker.v1.KeyBroker/UnwrapKey")
        .map(|r| {
            (
                r["outcome"].as_str().unwrap(),
                r["reason"].as_str().unwrap(),
                r["reason_detail"].as_str(),
            )
        })
        .collect();
    // A detail too long to accept is kept cut, as all request text is.
    let cut = format!("{}…", "x".repeat(128));
    assert_eq!(
        unwraps,
        vec![
            ("OK", "none", None),
            ("PERMISSION_DENIED", "legal_request", Some("LR-9")),
            ("INVALID_ARGUMENT", "customer_support", None),
            ("INVALID_ARGUMENT", "none", None),
            ("INVALID_ARGUMENT", "none", Some("x")),
            ("INVALID_ARGUMENT", "migration", Some(cut.as_str())),
            ("INVALID_ARGUMENT", "migration", Some("a\\u{7}b")),
            ("PERMISSION_DENIED", "none", None),
            ("PERMISSION_DENIED", "migration", None),
            ("OK", "customer_support", Some("TICKET-7")),
            ("OK", "none", None),
        ]
    );
    let batch: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["method"] == "keybroker.v1.KeyBroker/BatchUnwrapKey")
        .map(|r| {
            (
                r["outcome"].as_str().unwrap(),
                r["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        batch,
        vec![
            ("OK", "customer_initiated"),
            ("PERMISSION_DENIED", "migration"),
            ("PERMISSION_DENIED", "none"),
            ("PERMISSION_DENIED", "legal_request"),
        ]
    );
    // Admin calls take no reason and their records carry none.
    assert!(
        records
            .iter()
            .filter(|r| r["method"]
                .as_str()
                .unwrap()
                .starts_with("keybroker.v1.KeyAdmin/"))
            .all(|r| r["reason"].is_null())
    );
    server.stop().await;
}

/// A tenant's new access policy is in force on every replica within the
/// bound a revocation has (the change feed; here the view TTL is an hour),
/// before any key is touched there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_policy_reaches_every_replica_within_the_revocation_bound() {
    use proto::AccessReason as R;
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let url = fresh_postgres_database().await;
    let (a, b, _dirs) = crate::aws_support::replicas_on_postgres(&moto, &url).await;
    let mut admin_a = admin_client(&a).await;
    let mut broker_a = a.client().await;
    let mut broker_b = b.client().await;
    create_tenant(&mut admin_a, TENANT, proto::KeyPolicy::Unspecified).await;
    admin_a
        .link_key(link_request("cmk", &key_arn, &[], false))
        .await
        .unwrap();
    let dek = generate(&mut broker_a, TENANT, &[]).await.unwrap();
    // B serves it from its cache.
    unwrap_for(&mut broker_b, &dek.wrapped_key, None)
        .await
        .unwrap();
    unwrap_for(&mut broker_b, &dek.wrapped_key, None)
        .await
        .unwrap();
    let before = touched(&b);

    set_policy(&mut admin_a, true, &[R::CustomerInitiated])
        .await
        .unwrap();
    let set = Instant::now();
    let err = loop {
        match unwrap_for(&mut broker_b, &dek.wrapped_key, None).await {
            Ok(_) => assert!(
                set.elapsed() < Duration::from_secs(2),
                "replica B still served a call without a reason 2 s after the tenant required one"
            ),
            Err(err) => break err,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "access policy set on A enforced by B after {:?}",
        set.elapsed()
    );
    assert_eq!(
        refused(&err, tonic::Code::PermissionDenied),
        "ACCESS_REASON_REFUSED"
    );
    let refusals_touched = touched(&b);
    // The calls B served before it learned are hits; the refusal touched
    // nothing.
    assert_eq!(
        (refusals_touched.0, refusals_touched.1, refusals_touched.3),
        (before.0, before.1, before.3)
    );
    let served = unwrap_for(
        &mut broker_b,
        &dek.wrapped_key,
        justified(R::CustomerInitiated, ""),
    )
    .await
    .unwrap();
    assert_eq!(served, dek.plaintext.to_vec());
    assert_eq!(
        touched(&b).2,
        refusals_touched.2 + 1,
        "served from B's cache"
    );
    a.stop().await;
    b.stop().await;
}

/// Every use of a tenant's key, on any replica, is in its access log, and
/// the counts are exact: the log's totals per (operation, reason, outcome)
/// equal what the clients saw, call by call. Refusals and uses with a
/// detail are there one by one as well. Read through ListKeyAccess (paged)
/// and exported by `kb admin access-log` as JSON Lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_counts_every_use_exactly_across_replicas() {
    use proto::AccessReason as R;
    use std::collections::BTreeMap;
    let moto = Moto::start();
    let key_arn = moto.create_key("us-east-1", false).await;
    let url = fresh_postgres_database().await;
    let (a, b, _dirs) = crate::aws_support::replicas_on_postgres(&moto, &url).await;
    let mut admin_a = admin_client(&a).await;
    let mut broker_a = a.client().await;
    let mut broker_b = b.client().await;
    create_tenant(&mut admin_a, TENANT, proto::KeyPolicy::Unspecified).await;
    admin_a
        .link_key(link_request("cmk", &key_arn, &[], false))
        .await
        .unwrap();

    // What the clients saw: (operation, reason, outcome) -> calls.
    let mut seen: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut tally = |op: &str, reason: &str, result: Result<(), tonic::Status>| {
        let outcome = match result {
            Ok(()) => "OK".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        *seen.entry((op.into(), reason.into(), outcome)).or_default() += 1;
    };
    let dek = generate(&mut broker_a, TENANT, &[]).await.unwrap();
    tally("GenerateDataKey", "none", Ok(()));
    for _ in 0..5 {
        let r = generate(&mut broker_b, TENANT, &[]).await.map(|_| ());
        tally("GenerateDataKey", "none", r);
    }
    for (broker, n) in [(&mut broker_a, 30), (&mut broker_b, 20)] {
        for _ in 0..n {
            let r = unwrap_for(
                broker,
                &dek.wrapped_key,
                justified(R::CustomerInitiated, ""),
            )
            .await
            .map(|_| ());
            tally("UnwrapKey", "customer_initiated", r);
        }
    }
    for _ in 0..3 {
        let r = unwrap_for(
            &mut broker_b,
            &dek.wrapped_key,
            justified(R::CustomerSupport, "T-1"),
        )
        .await
        .map(|_| ());
        tally("UnwrapKey", "customer_support", r);
    }
    // The tenant starts requiring a reason: B's calls without one are
    // refused as soon as it learns (some may still pass before).
    set_policy(&mut admin_a, true, &[]).await.unwrap();
    let mut refused_on_b = 0;
    let mut attempt = 0;
    while refused_on_b < 4 {
        // The caller's request id: kept in an individual record.
        attempt += 1;
        let mut request = tonic::Request::new(unwrap_req(TENANT, &[], &dek.wrapped_key));
        request
            .metadata_mut()
            .insert("x-request-id", format!("req-{attempt}").parse().unwrap());
        let r = broker_b.unwrap_key(request).await.map(|_| ());
        refused_on_b += u32::from(r.is_err());
        tally("UnwrapKey", "none", r);
    }
    // A batch: its items are counted as their single operation.
    let items = (0..7)
        .map(|_| {
            let mut item = unwrap_req(TENANT, &[], &dek.wrapped_key);
            item.justification = justified(R::Migration, "");
            item
        })
        .collect();
    let results = broker_a
        .batch_unwrap_key(proto::BatchUnwrapKeyRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    for r in &results {
        let status = r.status.as_ref().unwrap();
        let result = if status.code == 0 {
            Ok(())
        } else {
            Err(tonic::Status::new(status.code.into(), ""))
        };
        tally("UnwrapKey", "migration", result);
    }
    a.access_log.flush().await.unwrap();
    b.access_log.flush().await.unwrap();
    assert_eq!((a.access_log.pending(), b.access_log.pending()), (0, 0));

    // Read back in pages of 3.
    let mut logged: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut individual = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin_a
            .list_key_access(proto::ListKeyAccessRequest {
                tenant_id: TENANT.into(),
                page_size: 3,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        for r in page.records {
            let reason = keybroker::access::Reason::from_proto(r.reason).unwrap();
            if r.individual {
                individual.push(r);
            } else {
                *logged
                    .entry((r.operation.clone(), reason.to_string(), r.outcome.clone()))
                    .or_default() += r.count;
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages > 2, "paged: {pages}");
    let seen: BTreeMap<_, _> = seen
        .into_iter()
        .map(|((op, reason, outcome), n)| {
            let outcome = match outcome.as_str() {
                "Ok" | "OK" => "OK".to_owned(),
                "PermissionDenied" => "PERMISSION_DENIED".to_owned(),
                other => other.to_owned(),
            };
            ((op, reason, outcome), n)
        })
        .collect();
    assert_eq!(logged, seen, "the log's counts are the calls made");
    let total: u64 = logged.values().sum();
    println!(
        "{total} uses logged exactly, {} records one by one",
        individual.len()
    );

    // One by one: the 4 refusals (with their message) and the 3 support
    // uses (with the ticket), each with its request id.
    let refusals: Vec<_> = individual
        .iter()
        .filter(|r| r.outcome == "PERMISSION_DENIED")
        .collect();
    assert_eq!(refusals.len(), 4);
    assert!(
        refusals
            .iter()
            .all(|r| r.error.contains("requires a reason")
                && r.key_binding.is_empty()
                && r.request_id.starts_with("req-"))
    );
    let support: Vec<_> = individual
        .iter()
        .filter(|r| r.reason == R::CustomerSupport as i32)
        .collect();
    assert_eq!(support.len(), 3);
    assert!(support.iter().all(|r| r.reason_detail == "T-1"
        && r.key_binding == "cmk"
        && r.outcome == "OK"
        && r.count == 1));
    assert_eq!(individual.len(), 7);

    // Filters: B's refusals alone.
    let denied = admin_a
        .list_key_access(proto::ListKeyAccessRequest {
            tenant_id: TENANT.into(),
            outcome: "PERMISSION_DENIED".into(),
            individual_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.records.len(), 4);
    let bad = admin_a
        .list_key_access(proto::ListKeyAccessRequest {
            tenant_id: TENANT.into(),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");

    // The CLI's export: every record, one JSON object per line.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("access.jsonl");
    let summary = crate::batch::cli_json(
        [
            "admin",
            "--server",
            &a.url(),
            "access-log",
            "--tenant",
            TENANT,
            "--since",
            "1h",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        String::new(),
    )
    .await;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let exported: u64 = lines
        .iter()
        .filter(|l| l["individual"] == false)
        .map(|l| l["count"].as_u64().unwrap())
        .sum();
    assert_eq!(exported, total);
    assert_eq!(summary["records"], lines.len() as u64);
    assert!(
        lines
            .iter()
            .any(|l| l["reason"] == "customer_support" && l["reason_detail"] == "T-1")
    );
    a.stop().await;
    b.stop().await;
}
