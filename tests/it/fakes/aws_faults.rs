//! A fault server that answers in the real AWS wire formats (KMS JSON
//! errors, STS XML) for the key states and failures moto does not enforce:
//! disabled keys, denied roles, timeouts. Served with axum, like every fake.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

/// What the fault server answers for one operation.
#[derive(Clone)]
pub(crate) enum Fault {
    /// An AWS JSON error (KMS): HTTP status and `__type`.
    KmsError(u16, &'static str),
    /// STS AccessDenied in STS's XML.
    StsDenied,
    /// Accept the request and never answer.
    Hang,
    /// A successful KMS JSON answer.
    KmsOk(String),
}

/// Answers AWS requests with scripted faults, counting attempts by
/// operation (`TrentService.Decrypt`, `AssumeRole`...). AssumeRole succeeds
/// unless scripted otherwise.
#[derive(Clone)]
pub(crate) struct FaultServer {
    pub(crate) url: String,
    faults: Arc<Mutex<HashMap<String, Fault>>>,
    /// Scripted by what the request body contains, checked first:
    /// (operation, needle, fault).
    when: Arc<Mutex<Vec<(String, String, Fault)>>>,
    counts: Arc<Mutex<HashMap<String, u64>>>,
    /// Body of the last request of each operation.
    bodies: Arc<Mutex<HashMap<String, String>>>,
}

impl FaultServer {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = Self {
            url,
            faults: Arc::default(),
            when: Arc::default(),
            counts: Arc::default(),
            bodies: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(server.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        server
    }

    pub(crate) fn set(&self, operation: &str, fault: Fault) {
        self.faults
            .lock()
            .unwrap()
            .insert(operation.to_owned(), fault);
    }

    /// Answers `operation` with `fault` when its body contains `needle`
    /// (before anything `set` scripted).
    pub(crate) fn set_when(&self, operation: &str, needle: &str, fault: Fault) {
        self.when
            .lock()
            .unwrap()
            .push((operation.to_owned(), needle.to_owned(), fault));
    }

    /// Decrypts of keybroker's canary (its own bytes, no caller's) succeed:
    /// the key works for keybroker, whatever is scripted for other bytes.
    pub(crate) fn serve_canary(&self, key_arn: &str) {
        use base64::Engine as _;
        let plaintext = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        self.set_when(
            "trentservice.decrypt",
            "keybroker:canary",
            Fault::KmsOk(format!(
                r#"{{"KeyId":"{key_arn}","Plaintext":"{plaintext}","EncryptionAlgorithm":"SYMMETRIC_DEFAULT"}}"#
            )),
        );
    }

    pub(crate) fn last_body(&self, operation: &str) -> Option<String> {
        self.bodies.lock().unwrap().get(operation).cloned()
    }

    pub(crate) fn count(&self, operation: &str) -> u64 {
        *self.counts.lock().unwrap().get(operation).unwrap_or(&0)
    }
}

/// One AWS request: counted, recorded, answered as scripted.
async fn answer(State(server): State<FaultServer>, headers: HeaderMap, body: Bytes) -> Response {
    let body = String::from_utf8_lossy(&body).into_owned();
    let s = &server;
    let operation = headers
        .get("x-amz-target")
        .and_then(|t| t.to_str().ok())
        .map(|t| t.trim().to_lowercase())
        .or_else(|| {
            body.contains("Action=AssumeRole")
                .then(|| "assumerole".to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    *s.counts
        .lock()
        .unwrap()
        .entry(operation.clone())
        .or_default() += 1;
    s.bodies
        .lock()
        .unwrap()
        .insert(operation.clone(), body.clone());
    let scripted = s
        .when
        .lock()
        .unwrap()
        .iter()
        .find(|(op, needle, _)| *op == operation && body.contains(needle.as_str()))
        .map(|(_, _, fault)| fault.clone());
    let fault = scripted.or_else(|| s.faults.lock().unwrap().get(&operation).cloned());
    let (status, content_type, payload) = match fault {
            Some(Fault::Hang) => {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                (500, "text/plain", String::new())
            }
            Some(Fault::KmsOk(json)) => (200, "application/x-amz-json-1.1", json),
            Some(Fault::KmsError(status, code)) => (
                status,
                "application/x-amz-json-1.1",
                format!(r#"{{"__type":"{code}","message":"injected {code}"}}"#),
            ),
            Some(Fault::StsDenied) => (
                403,
                "text/xml",
                "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User is not authorized to perform: sts:AssumeRole</Message></Error><RequestId>r1</RequestId></ErrorResponse>".to_owned(),
            ),
            None if operation == "assumerole" => (
                200,
                "text/xml",
                "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult><Credentials><AccessKeyId>ASIATEST</AccessKeyId><SecretAccessKey>secret</SecretAccessKey><SessionToken>token</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration></Credentials><AssumedRoleUser><AssumedRoleId>AROATEST:kb</AssumedRoleId><Arn>arn:aws:sts::123456789012:assumed-role/r/kb</Arn></AssumedRoleUser></AssumeRoleResult><ResponseMetadata><RequestId>r2</RequestId></ResponseMetadata></AssumeRoleResponse>".to_owned(),
            ),
            None => (
                500,
                "application/x-amz-json-1.1",
                r#"{"__type":"KMSInternalException","message":"unscripted"}"#.to_owned(),
            ),
        };
    (
        StatusCode::from_u16(status).unwrap(),
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::HeaderName::from_static("x-amzn-requestid"),
                "fault-1",
            ),
        ],
        payload,
    )
        .into_response()
}
