//! A fake Google Cloud KMS speaking the REST/JSON protocol of
//! `cloudkms.googleapis.com/v1`, the transport of Google's Rust client
//! (`google-cloud-kms-v1`) and of the Python client's `rest` transport.
//!
//! No emulator of Cloud KMS exists, so this one implements what keybroker
//! relies on, with Cloud KMS's own semantics and error shapes:
//! - key rings, crypto keys (purpose, rotation period, protection level),
//!   versions with states (ENABLED, DISABLED, DESTROY_SCHEDULED, DESTROYED)
//!   and primary rotation (`updatePrimaryVersion`);
//! - Encrypt / Decrypt with AES-256-GCM and AAD; Encrypt uses the primary and
//!   names the version used; the ciphertext names its version, so Decrypt
//!   needs only the CryptoKey, and old versions keep decrypting;
//! - CRC32C integrity fields, checked on requests (INVALID_ARGUMENT on a
//!   mismatch) and set on responses;
//! - IAM policies on crypto keys (`setIamPolicy`): with bindings set, only
//!   their members may use the key (PERMISSION_DENIED otherwise); a key
//!   without a policy is usable by any caller, as with a project-level grant;
//! - IAM Credentials `generateAccessToken`, so service-account impersonation
//!   is enforced end to end (tokens name their principal);
//! - errors as `{"error": {"code", "message", "status"}}`.
//!
//! `tests/it/gcp.rs` proves the fidelity with Google's Python client.
//!
//! One file per resource: `crypto_keys` (key rings, crypto keys), `versions`,
//! `crypto` (Encrypt, Decrypt), `iam` (policies, impersonation, tokens);
//! `customer` administers keys through Google's client, `proxy` carries
//! impersonation to the fake over TLS.

// The fake's errors are its HTTP responses, returned as they are.
#![allow(clippy::result_large_err)]

mod crypto;
mod crypto_keys;
mod customer;
mod iam;
mod proxy;
mod versions;

pub(crate) use self::customer::{CloudKmsAdmin, CryptoKeyPurpose, CryptoKeyVersionState, PARENT};
pub(crate) use self::proxy::GoogleApisProxy;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

/// Faults a test switches on.
#[derive(Debug, Default, Clone)]
pub(crate) struct Faults {
    /// Responses carry a wrong CRC32C (corruption on the way back).
    pub(crate) corrupt_response_crc: bool,
    /// Encrypt answers without confirming the request checksums (as if the
    /// request had been verified by nobody).
    pub(crate) unverified_request: bool,
    /// The next N calls answer 503 UNAVAILABLE.
    pub(crate) unavailable_calls: u32,
    /// The next N calls answer 429 RESOURCE_EXHAUSTED.
    pub(crate) exhausted_calls: u32,
    /// Every call waits this long before answering.
    pub(crate) delay: std::time::Duration,
}

#[derive(Debug, Default)]
struct Version {
    state: &'static str,
    material: [u8; 32],
    create_time: String,
    destroy_time: Option<String>,
}

#[derive(Debug)]
struct CryptoKey {
    purpose: String,
    create_time: String,
    rotation_period: Option<String>,
    next_rotation_time: Option<String>,
    protection_level: String,
    primary: Option<u32>,
    versions: BTreeMap<u32, Version>,
    /// role -> members.
    iam: Vec<(String, Vec<String>)>,
    etag: u64,
    /// The key's labels (keybroker reads `keybroker-tenant`).
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Kms {
    key_rings: BTreeMap<String, String>,
    keys: BTreeMap<String, CryptoKey>,
    faults: Faults,
    /// Calls by method name (`encrypt`, `decrypt`, `getCryptoKey`...).
    calls: HashMap<String, u64>,
    /// Access token -> principal (`serviceAccount:...`).
    tokens: HashMap<String, String>,
    /// Principals allowed to mint tokens for a service account (its
    /// `roles/iam.serviceAccountTokenCreator` members); keyed by email.
    token_creators: HashMap<String, Vec<String>>,
}

/// A running fake, served on 127.0.0.1 until dropped.
#[derive(Debug)]
pub(crate) struct FakeCloudKms {
    pub(crate) url: String,
    state: Arc<Mutex<Kms>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCloudKms {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeCloudKms {
    pub(crate) async fn start() -> Self {
        let state = Arc::new(Mutex::new(Kms::default()));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    /// The router, for serving behind another listener (the TLS proxy).
    pub(crate) fn router(&self) -> axum::Router {
        axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&self.state))
    }

    pub(crate) fn set_faults(&self, faults: Faults) {
        self.state.lock().unwrap().faults = faults;
    }

    /// Ends a scheduled destruction now (Cloud KMS does it after the key's
    /// `destroyScheduledDuration`): the version is DESTROYED, its material
    /// gone.
    pub(crate) fn complete_destruction(&self, version: &str) {
        let (key, id) = split_version(version).unwrap();
        let mut kms = self.state.lock().unwrap();
        let v = kms
            .keys
            .get_mut(key)
            .unwrap()
            .versions
            .get_mut(&id)
            .unwrap();
        assert_eq!(v.state, "DESTROY_SCHEDULED");
        v.state = "DESTROYED";
        v.material = [0; 32];
    }

    pub(crate) fn calls(&self, method: &str) -> u64 {
        self.state
            .lock()
            .unwrap()
            .calls
            .get(method)
            .copied()
            .unwrap_or(0)
    }

    /// Lets `creator` impersonate `service_account` (the Token Creator role).
    pub(crate) fn allow_impersonation(&self, service_account: &str, creator: &str) {
        self.state
            .lock()
            .unwrap()
            .token_creators
            .entry(service_account.to_owned())
            .or_default()
            .push(creator.to_owned());
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    SystemRandom::new().fill(&mut out).unwrap();
    out
}

fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// Google's REST error shape.
fn error(code: StatusCode, status: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "error": { "code": code.as_u16(), "message": message.into(), "status": status }
    });
    (code, axum::Json(body)).into_response()
}

fn ok(value: Value) -> Response {
    (StatusCode::OK, axum::Json(value)).into_response()
}

fn not_found(kind: &str, name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!("{kind} {name} not found."),
    )
}

fn invalid(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
}

fn precondition(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "FAILED_PRECONDITION", message)
}

fn query(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

/// int64 fields arrive as JSON strings (proto3 JSON) or numbers.
fn int64(body: &Value, field: &str) -> Option<i64> {
    match body.get(field)? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn bytes_field(body: &Value, field: &str) -> Result<Vec<u8>, Response> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => B64
            .decode(s)
            .map_err(|_| invalid(format!("Invalid value at '{field}': not base64"))),
        Some(_) => Err(invalid(format!("Invalid value at '{field}'"))),
    }
}

/// `a/b/c` split into segments, checked against `projects/*/locations/*/...`.
fn is_key_ring(name: &str) -> bool {
    let s: Vec<&str> = name.split('/').collect();
    s.len() == 6 && s[0] == "projects" && s[2] == "locations" && s[4] == "keyRings"
}

fn is_crypto_key(name: &str) -> bool {
    let s: Vec<&str> = name.split('/').collect();
    s.len() == 8 && is_key_ring(&s[..6].join("/")) && s[6] == "cryptoKeys"
}

fn split_version(name: &str) -> Option<(&str, u32)> {
    let (key, id) = name.rsplit_once("/cryptoKeyVersions/")?;
    Some((key, id.parse().ok()?))
}

impl CryptoKey {
    fn json(&self, name: &str) -> Value {
        let mut out = json!({
            "name": name,
            "purpose": self.purpose,
            "createTime": self.create_time,
            "versionTemplate": {
                "protectionLevel": self.protection_level,
                "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION",
            },
            "destroyScheduledDuration": "86400s",
        });
        if let Some(id) = self.primary {
            out["primary"] = self.version_json(name, id);
        }
        if let Some(period) = &self.rotation_period {
            out["rotationPeriod"] = json!(period);
        }
        if let Some(next) = &self.next_rotation_time {
            out["nextRotationTime"] = json!(next);
        }
        if !self.labels.is_empty() {
            out["labels"] = json!(self.labels);
        }
        out
    }

    fn version_json(&self, key: &str, id: u32) -> Value {
        let v = &self.versions[&id];
        let mut out = json!({
            "name": format!("{key}/cryptoKeyVersions/{id}"),
            "state": v.state,
            "protectionLevel": self.protection_level,
            "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION",
            "createTime": v.create_time,
            "generateTime": v.create_time,
        });
        if let Some(t) = &v.destroy_time {
            out["destroyTime"] = json!(t);
        }
        out
    }

    fn add_version(&mut self) -> u32 {
        let id = self.versions.keys().last().copied().unwrap_or(0) + 1;
        self.versions.insert(
            id,
            Version {
                state: "ENABLED",
                material: random::<32>(),
                create_time: now(),
                destroy_time: None,
            },
        );
        id
    }

    /// May `principal` exercise a permission needing one of `roles`?
    fn allows(&self, principal: &str, roles: &[&str]) -> bool {
        if self.iam.is_empty() {
            return true;
        }
        self.iam.iter().any(|(role, members)| {
            roles.contains(&role.as_str())
                && members.iter().any(|m| m == principal || m == "allUsers")
        })
    }
}

const ENCRYPT_ROLES: &[&str] = &[
    "roles/cloudkms.cryptoKeyEncrypterDecrypter",
    "roles/cloudkms.cryptoKeyEncrypter",
    "roles/cloudkms.admin",
];
const DECRYPT_ROLES: &[&str] = &[
    "roles/cloudkms.cryptoKeyEncrypterDecrypter",
    "roles/cloudkms.cryptoKeyDecrypter",
    "roles/cloudkms.admin",
];
const VIEW_ROLES: &[&str] = &[
    "roles/cloudkms.viewer",
    "roles/cloudkms.cryptoKeyEncrypterDecrypter",
    "roles/cloudkms.admin",
];

fn denied(permission: &str, resource: &str) -> Response {
    error(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        format!("Permission '{permission}' denied on resource '{resource}' (or it may not exist)."),
    )
}

/// Enum fields of the Cloud KMS resources and their proto numbers. Google's
/// clients ask for `$alt=json;enum-encoding=int`: enums travel as numbers
/// both ways; without it they are names.
const ENUMS: &[(&str, &[(i64, &str)])] = &[
    (
        "purpose",
        &[
            (0, "CRYPTO_KEY_PURPOSE_UNSPECIFIED"),
            (1, "ENCRYPT_DECRYPT"),
            (5, "ASYMMETRIC_SIGN"),
            (6, "ASYMMETRIC_DECRYPT"),
            (7, "RAW_ENCRYPT_DECRYPT"),
            (9, "MAC"),
        ],
    ),
    (
        "protectionLevel",
        &[
            (0, "PROTECTION_LEVEL_UNSPECIFIED"),
            (1, "SOFTWARE"),
            (2, "HSM"),
            (3, "EXTERNAL"),
            (4, "EXTERNAL_VPC"),
        ],
    ),
    (
        "state",
        &[
            (0, "CRYPTO_KEY_VERSION_STATE_UNSPECIFIED"),
            (1, "ENABLED"),
            (2, "DISABLED"),
            (3, "DESTROYED"),
            (4, "DESTROY_SCHEDULED"),
            (5, "PENDING_GENERATION"),
            (6, "PENDING_IMPORT"),
            (7, "IMPORT_FAILED"),
        ],
    ),
    (
        "algorithm",
        &[
            (0, "CRYPTO_KEY_VERSION_ALGORITHM_UNSPECIFIED"),
            (1, "GOOGLE_SYMMETRIC_ENCRYPTION"),
        ],
    ),
];

/// Rewrites every enum field of `value` to numbers (`to_ints`) or names.
fn recode_enums(value: &mut Value, to_ints: bool) {
    match value {
        Value::Object(map) => {
            for (field, v) in map.iter_mut() {
                if let Some((_, table)) = ENUMS.iter().find(|(name, _)| name == field) {
                    let found = match v {
                        Value::Number(n) => table.iter().find(|(i, _)| Some(*i) == n.as_i64()),
                        Value::String(s) => table.iter().find(|(_, name)| name == s),
                        _ => None,
                    };
                    if let Some((i, name)) = found {
                        *v = if to_ints { json!(i) } else { json!(name) };
                    }
                } else {
                    recode_enums(v, to_ints);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| recode_enums(v, to_ints)),
        _ => {}
    }
}

async fn handle(
    State(state): State<Arc<Mutex<Kms>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path() == "/token" {
        return iam::oauth_token(&state, &body);
    }
    let mut body: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return invalid(format!("Invalid JSON payload received. {e}")),
        }
    };
    recode_enums(&mut body, false);
    let delay = state.lock().unwrap().faults.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let int_enums = query(&uri, "%24alt")
        .or_else(|| query(&uri, "$alt"))
        .is_some_and(|alt| {
            alt.contains("enum-encoding%3Dint") || alt.contains("enum-encoding=int")
        });
    let response = {
        let mut kms = state.lock().unwrap();
        route(&mut kms, method, &uri, &headers, &body)
    };
    if !int_enums || response.status() != StatusCode::OK {
        return response;
    }
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let mut value: Value = serde_json::from_slice(&bytes).unwrap();
    recode_enums(&mut value, true);
    ok(value)
}

fn route(kms: &mut Kms, method: Method, uri: &Uri, headers: &HeaderMap, body: &Value) -> Response {
    // Who calls: a bearer token names its principal; none is anonymous.
    let principal = match headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        None => "allUsers".to_owned(),
        Some(token) => match kms.tokens.get(token) {
            Some(p) => p.clone(),
            None => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                );
            }
        },
    };
    let path = uri.path().to_owned();
    let Some(rest) = path.strip_prefix("/v1/") else {
        return not_found("Path", &path);
    };
    let rest = rest.to_owned();
    if kms.faults.unavailable_calls > 0 {
        kms.faults.unavailable_calls -= 1;
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "The service is currently unavailable.",
        );
    }
    if kms.faults.exhausted_calls > 0 {
        kms.faults.exhausted_calls -= 1;
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Cryptographic requests' and limit 'Cryptographic requests per minute'.",
        );
    }
    let (resource, verb) = match rest.rsplit_once(':') {
        // A colon after the last slash is a custom method.
        Some((r, v)) if !v.contains('/') => (r.to_owned(), Some(v.to_owned())),
        _ => (rest.clone(), None),
    };
    match (method.clone(), verb.as_deref()) {
        (Method::POST, Some("generateAccessToken")) => {
            iam::generate_access_token(kms, &principal, &resource)
        }
        (Method::POST, Some("encrypt")) => {
            *kms.calls.entry("encrypt".to_owned()).or_default() += 1;
            crypto::encrypt(kms, &principal, &resource, body)
        }
        (Method::POST, Some("decrypt")) => {
            *kms.calls.entry("decrypt".to_owned()).or_default() += 1;
            crypto::decrypt(kms, &principal, &resource, body)
        }
        (Method::POST, Some("updatePrimaryVersion")) => {
            crypto_keys::update_primary(kms, &resource, body)
        }
        (Method::POST, Some(verb @ ("destroy" | "restore"))) => {
            versions::destroy_or_restore(kms, verb, &resource)
        }
        (Method::POST, Some("setIamPolicy")) => iam::set_policy(kms, &resource, body),
        (Method::GET | Method::POST, Some("getIamPolicy")) => iam::get_policy(kms, &resource),
        (Method::POST, None) if resource.ends_with("/keyRings") => {
            crypto_keys::create_key_ring(kms, uri, &resource)
        }
        (Method::POST, None) if resource.ends_with("/cryptoKeys") => {
            crypto_keys::create_crypto_key(kms, uri, &resource, body)
        }
        (Method::POST, None) if resource.ends_with("/cryptoKeyVersions") => {
            versions::create(kms, &resource)
        }
        (Method::PATCH, None) if split_version(&resource).is_none() => {
            crypto_keys::update(kms, uri, &resource, body)
        }
        (Method::PATCH, None) => versions::set_state(kms, uri, &resource, body),
        (Method::GET, None) => crypto_keys::get(kms, &principal, &resource),
        _ => error(
            StatusCode::NOT_IMPLEMENTED,
            "UNIMPLEMENTED",
            format!("{method} {path} is not implemented by the fake"),
        ),
    }
}
