//! Tests of `api/call.rs`.

use std::time::Duration;

use super::*;
use crate::audit::{AuditSettings, AuditTarget};
use crate::authz::Policy;

const UNWRAP: &str = "keybroker.v1.KeyBroker/UnwrapKey";

fn observers(audit: &std::path::Path, request_timeout: Duration) -> Observers {
    let settings = AuditSettings {
        target: AuditTarget::File(audit.to_path_buf()),
        ..AuditSettings::default()
    };
    Observers {
        audit: Arc::new(AuditLog::open(&settings).expect("audit file")),
        metrics: Arc::new(crate::metrics::Metrics::new(false, crate::authz::METHODS)),
        request_timeout,
        affinity_header: crate::api::affinity::header_key(crate::api::affinity::DEFAULT_HEADER)
            .expect("header"),
    }
}

/// An UnwrapKey request as the auth layer hands it on: alice may unwrap
/// for tenant t1 only.
fn request(tenant_id: &str) -> Request<proto::UnwrapKeyRequest> {
    let policy = Arc::new(
        Policy::parse(&format!(
            "[[allow]]\nidentities = [\"dns:alice\"]\nmethods = [\"{UNWRAP}\"]\ntenants = [\"t1\"]\n"
        ))
        .expect("policy"),
    );
    let method: Arc<str> = UNWRAP.into();
    let mut request = Request::new(item(tenant_id, 7));
    request.extensions_mut().insert(CallContext {
        identity: "dns:alice".into(),
        peer: None,
        grant: policy.grant("dns:alice".into(), Arc::clone(&method)),
        method,
        request_id: Some("req-1".into()),
        started: std::time::Instant::now(),
    });
    request
}

fn item(tenant_id: &str, marker: u8) -> proto::UnwrapKeyRequest {
    proto::UnwrapKeyRequest {
        tenant_id: tenant_id.into(),
        wrapped_key: vec![marker; 40].into(),
        context: Default::default(),
        justification: None,
    }
}

fn response() -> proto::UnwrapKeyResponse {
    proto::UnwrapKeyResponse {
        plaintext: vec![1; 32].into(),
        key: None,
        rewrap_recommended: false,
    }
}

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("audit file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

fn rpc_count(observers: &Observers, code: &str) -> u64 {
    let text = observers.metrics.encode().expect("metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("keybroker_rpc_requests_total{")
                && l.contains(UNWRAP)
                && l.contains(&format!("code=\"{code}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(start_paused = true)]
async fn within_arms_no_timer_for_a_ready_call_and_cuts_a_waiting_one() {
    let limit = Duration::from_secs(1);
    let start = tokio::time::Instant::now();
    assert_eq!(within(limit, async { Ok(7) }).await.ok(), Some(7));
    assert_eq!(start.elapsed(), Duration::ZERO);

    let fast = within(limit, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(8)
    });
    assert_eq!(fast.await.ok(), Some(8));
    assert_eq!(start.elapsed(), Duration::from_millis(300));

    let slow = within(limit, async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(9)
    });
    let status = slow.await.expect_err("past the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(
        status.message().contains("request_timeout (1s)"),
        "{}",
        status.message()
    );
    assert_eq!(start.elapsed(), Duration::from_millis(1300));
}

#[tokio::test(start_paused = true)]
async fn serve_now_answers_at_once_or_parks_and_each_call_gets_one_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.log");
    let observers = observers(&audit, Duration::from_secs(2));

    // A hit: answered without a future, audited as a cache hit.
    let answered = serve_now(&observers, request("t1"), |req| {
        assert_eq!(req.tenant_id, "t1");
        Ok::<_, ()>(Ok(response()))
    });
    let Served::Answered(Ok(hit)) = answered else {
        panic!("a hit is answered at once");
    };
    assert_eq!(hit.get_ref().plaintext, vec![1; 32]);

    // A miss: parked, then served by the handler that waits; the
    // DEK load and the provider call it notes reach the record.
    let parked = serve_now(&observers, request("t1"), |req| {
        Err::<Result<proto::UnwrapKeyResponse, Status>, _>(req.wrapped_key.len())
    });
    let Served::Parked(parked) = parked else {
        panic!("a miss is parked");
    };
    let loaded = parked
        .serve(&observers, |len| async move {
            assert_eq!(len, 40);
            tokio::time::sleep(Duration::from_millis(100)).await;
            audit::note_dek_load();
            audit::note_provider_call();
            Ok(response())
        })
        .await;
    assert!(loaded.is_ok(), "{loaded:?}");

    // Another tenant: refused before the handler runs.
    let denied = serve_now(
        &observers,
        request("t2"),
        |_| -> Result<Result<proto::UnwrapKeyResponse, Status>, ()> {
            panic!("a refused call never reaches its handler")
        },
    );
    let Served::Answered(Err(denied)) = denied else {
        panic!("a refusal is answered at once");
    };
    assert_eq!(denied.code(), Code::PermissionDenied);

    // A parked call that outlives request_timeout.
    let Served::Parked(parked) = serve_now(&observers, request("t1"), |_| {
        Err::<Result<proto::UnwrapKeyResponse, Status>, _>(())
    }) else {
        panic!("parked");
    };
    let late = parked
        .serve(&observers, |()| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(response())
        })
        .await
        .expect_err("past request_timeout");
    assert_eq!(late.code(), Code::DeadlineExceeded);

    let records = records(&audit);
    let summary: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r["tenant_id"].as_str().unwrap_or_default().to_owned(),
                r["outcome"].as_str().unwrap_or_default().to_owned(),
                r["cache_hit"].clone(),
                r["provider_calls"].as_u64(),
            )
        })
        .collect();
    let row = |t: &str, o: &str, hit: serde_json::Value, calls| {
        (t.to_owned(), o.to_owned(), hit, Some(calls))
    };
    assert_eq!(
        summary,
        [
            row("t1", "OK", true.into(), 0),
            row("t1", "OK", false.into(), 1),
            row("t2", "PERMISSION_DENIED", serde_json::Value::Null, 0),
            row("t1", "DEADLINE_EXCEEDED", serde_json::Value::Null, 0),
        ]
    );
    assert!(records.iter().all(|r| r["request_id"] == "req-1"));
    assert_eq!(rpc_count(&observers, "OK"), 2);
    assert_eq!(rpc_count(&observers, "PERMISSION_DENIED"), 1);
    assert_eq!(rpc_count(&observers, "DEADLINE_EXCEEDED"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_batch_item_past_the_deadline_answers_alone_and_is_audited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.log");
    let observers = observers(&audit, Duration::from_secs(2));
    let single = request("t1");
    let mut batch = Request::new(vec![item("t1", 1), item("t1", 2), item("t2", 3)]);
    let mut ctx = single
        .extensions()
        .get::<CallContext>()
        .cloned()
        .expect("context");
    ctx.method = "keybroker.v1.KeyBroker/BatchUnwrapKey".into();
    batch.extensions_mut().insert(ctx);
    let answers = serve_batch(
        &observers,
        batch,
        |req| match req.wrapped_key[0] {
            1 => Ok(Ok(response())),
            _ => Err(req.wrapped_key[0]),
        },
        |marker| async move {
            assert_eq!(marker, 2, "only the parked item waits");
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(response())
        },
    )
    .await
    .expect("the batch answers");
    let codes: Vec<_> = answers
        .iter()
        .map(|a| a.as_ref().map_or_else(Status::code, |_| Code::Ok))
        .collect();
    assert_eq!(
        codes,
        [Code::Ok, Code::DeadlineExceeded, Code::PermissionDenied]
    );
    let outcomes: Vec<_> = records(&audit)
        .iter()
        .map(|r| r["outcome"].as_str().unwrap_or_default().to_owned())
        .collect();
    // In the order they were answered: the waiting item last.
    assert_eq!(outcomes, ["OK", "PERMISSION_DENIED", "DEADLINE_EXCEEDED"]);
}
