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

// The fake's errors are its HTTP responses, returned as they are.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use keybroker::kms::gcp::crc32c;

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
        return oauth_token(&state, &body);
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
            generate_access_token(kms, &principal, &resource)
        }
        (Method::POST, Some("encrypt")) => {
            *kms.calls.entry("encrypt".to_owned()).or_default() += 1;
            encrypt(kms, &principal, &resource, body)
        }
        (Method::POST, Some("decrypt")) => {
            *kms.calls.entry("decrypt".to_owned()).or_default() += 1;
            decrypt(kms, &principal, &resource, body)
        }
        (Method::POST, Some("updatePrimaryVersion")) => {
            let Some(key) = kms.keys.get_mut(&resource) else {
                return not_found("CryptoKey", &resource);
            };
            let Some(id) = body["cryptoKeyVersionId"]
                .as_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                return invalid("cryptoKeyVersionId is required");
            };
            match key.versions.get(&id) {
                None => {
                    return not_found(
                        "CryptoKeyVersion",
                        &format!("{resource}/cryptoKeyVersions/{id}"),
                    );
                }
                Some(v) if v.state != "ENABLED" => {
                    return precondition(format!(
                        "The request cannot be fulfilled. Resource {resource}/cryptoKeyVersions/{id} has value {} in field crypto_key_version.state.",
                        v.state
                    ));
                }
                Some(_) => {}
            }
            key.primary = Some(id);
            ok(key.json(&resource))
        }
        (Method::POST, Some(verb @ ("destroy" | "restore"))) => {
            let Some((key_name, id)) = split_version(&resource) else {
                return invalid(format!("Invalid resource name {resource}"));
            };
            let Some(key) = kms.keys.get_mut(key_name) else {
                return not_found("CryptoKey", key_name);
            };
            let Some(v) = key.versions.get_mut(&id) else {
                return not_found("CryptoKeyVersion", &resource);
            };
            match (verb, v.state) {
                ("destroy", "ENABLED" | "DISABLED") => {
                    v.state = "DESTROY_SCHEDULED";
                    v.destroy_time = Some(now());
                }
                ("restore", "DESTROY_SCHEDULED") => {
                    v.state = "DISABLED";
                    v.destroy_time = None;
                }
                (_, state) => {
                    return precondition(format!(
                        "The request cannot be fulfilled. Resource {resource} has value {state} in field crypto_key_version.state."
                    ));
                }
            }
            let key_name = key_name.to_owned();
            ok(key.version_json(&key_name, id))
        }
        (Method::POST, Some("setIamPolicy")) => {
            let Some(key) = kms.keys.get_mut(&resource) else {
                return not_found("CryptoKey", &resource);
            };
            key.iam = body["policy"]["bindings"]
                .as_array()
                .map(|bindings| {
                    bindings
                        .iter()
                        .map(|b| {
                            let role = b["role"].as_str().unwrap_or_default().to_owned();
                            let members = b["members"]
                                .as_array()
                                .map(|m| {
                                    m.iter()
                                        .filter_map(|x| x.as_str().map(str::to_owned))
                                        .collect()
                                })
                                .unwrap_or_default();
                            (role, members)
                        })
                        .collect()
                })
                .unwrap_or_default();
            key.etag += 1;
            ok(iam_json(key))
        }
        (Method::GET | Method::POST, Some("getIamPolicy")) => match kms.keys.get(&resource) {
            Some(key) => ok(iam_json(key)),
            None => not_found("CryptoKey", &resource),
        },
        (Method::POST, None) if resource.ends_with("/keyRings") => {
            let parent = resource.trim_end_matches("/keyRings");
            let Some(id) = query(uri, "keyRingId") else {
                return invalid("keyRingId is required");
            };
            let name = format!("{parent}/keyRings/{id}");
            if !is_key_ring(&name) {
                return invalid(format!("Invalid resource name {name}"));
            }
            if kms.key_rings.contains_key(&name) {
                return error(
                    StatusCode::CONFLICT,
                    "ALREADY_EXISTS",
                    format!("KeyRing {name} already exists."),
                );
            }
            let created = now();
            kms.key_rings.insert(name.clone(), created.clone());
            ok(json!({ "name": name, "createTime": created }))
        }
        (Method::POST, None) if resource.ends_with("/cryptoKeys") => {
            let ring = resource.trim_end_matches("/cryptoKeys");
            if !kms.key_rings.contains_key(ring) {
                return not_found("KeyRing", ring);
            }
            let Some(id) = query(uri, "cryptoKeyId") else {
                return invalid("cryptoKeyId is required");
            };
            let name = format!("{ring}/cryptoKeys/{id}");
            if kms.keys.contains_key(&name) {
                return error(
                    StatusCode::CONFLICT,
                    "ALREADY_EXISTS",
                    format!("CryptoKey {name} already exists."),
                );
            }
            let purpose = body["purpose"].as_str().unwrap_or("").to_owned();
            if purpose.is_empty() || purpose == "CRYPTO_KEY_PURPOSE_UNSPECIFIED" {
                return invalid("The request cannot be fulfilled. A purpose must be specified.");
            }
            let mut key = CryptoKey {
                purpose,
                create_time: now(),
                rotation_period: body["rotationPeriod"].as_str().map(str::to_owned),
                next_rotation_time: body["nextRotationTime"].as_str().map(str::to_owned),
                protection_level: body["versionTemplate"]["protectionLevel"]
                    .as_str()
                    .unwrap_or("SOFTWARE")
                    .to_owned(),
                primary: None,
                versions: BTreeMap::new(),
                iam: Vec::new(),
                etag: 0,
            };
            if query(uri, "skipInitialVersionCreation").as_deref() != Some("true") {
                let id = key.add_version();
                if key.purpose == "ENCRYPT_DECRYPT" {
                    key.primary = Some(id);
                }
            }
            let out = key.json(&name);
            kms.keys.insert(name, key);
            ok(out)
        }
        (Method::POST, None) if resource.ends_with("/cryptoKeyVersions") => {
            let key_name = resource.trim_end_matches("/cryptoKeyVersions").to_owned();
            let Some(key) = kms.keys.get_mut(&key_name) else {
                return not_found("CryptoKey", &key_name);
            };
            let id = key.add_version();
            ok(key.version_json(&key_name, id))
        }
        (Method::PATCH, None) => {
            let Some((key_name, id)) = split_version(&resource) else {
                return invalid("only CryptoKeyVersion updates are implemented");
            };
            let key_name = key_name.to_owned();
            let Some(key) = kms.keys.get_mut(&key_name) else {
                return not_found("CryptoKey", &key_name);
            };
            let Some(v) = key.versions.get_mut(&id) else {
                return not_found("CryptoKeyVersion", &resource);
            };
            if query(uri, "updateMask").as_deref() != Some("state") {
                return invalid("The request cannot be fulfilled. update_mask must be \"state\".");
            }
            let wanted = body["state"].as_str().unwrap_or_default();
            match (v.state, wanted) {
                ("ENABLED" | "DISABLED", "ENABLED") => v.state = "ENABLED",
                ("ENABLED" | "DISABLED", "DISABLED") => v.state = "DISABLED",
                (state, _) => {
                    return precondition(format!(
                        "The request cannot be fulfilled. Resource {resource} has value {state} in field crypto_key_version.state."
                    ));
                }
            }
            ok(key.version_json(&key_name, id))
        }
        (Method::GET, None) => {
            *kms.calls.entry("get".to_owned()).or_default() += 1;
            if let Some(created) = kms.key_rings.get(&resource) {
                return ok(json!({ "name": resource, "createTime": created }));
            }
            if let Some((key_name, id)) = split_version(&resource) {
                return match kms.keys.get(key_name) {
                    Some(key) if key.versions.contains_key(&id) => {
                        ok(key.version_json(key_name, id))
                    }
                    _ => not_found("CryptoKeyVersion", &resource),
                };
            }
            match kms.keys.get(&resource) {
                Some(key) if !key.allows(&principal, VIEW_ROLES) => {
                    denied("cloudkms.cryptoKeys.get", &resource)
                }
                Some(key) => ok(key.json(&resource)),
                None if is_crypto_key(&resource) => not_found("CryptoKey", &resource),
                None => not_found("Resource", &resource),
            }
        }
        _ => error(
            StatusCode::NOT_IMPLEMENTED,
            "UNIMPLEMENTED",
            format!("{method} {path} is not implemented by the fake"),
        ),
    }
}

fn iam_json(key: &CryptoKey) -> Value {
    let bindings: Vec<Value> = key
        .iam
        .iter()
        .map(|(role, members)| json!({ "role": role, "members": members }))
        .collect();
    json!({ "version": 1, "etag": B64.encode(key.etag.to_be_bytes()), "bindings": bindings })
}

fn generate_access_token(kms: &mut Kms, principal: &str, resource: &str) -> Response {
    let Some(email) = resource.strip_prefix("projects/-/serviceAccounts/") else {
        return invalid(format!("Invalid resource name {resource}"));
    };
    let allowed = kms
        .token_creators
        .get(email)
        .is_some_and(|creators| creators.iter().any(|c| c == principal));
    if !allowed {
        return denied(
            "iam.serviceAccounts.getAccessToken",
            &format!("projects/-/serviceAccounts/{email}"),
        );
    }
    let token = format!("ya29.impersonated-{}", hex::encode(random::<16>()));
    *kms.calls
        .entry(format!("generateAccessToken:{email}"))
        .or_default() += 1;
    kms.tokens
        .insert(token.clone(), format!("serviceAccount:{email}"));
    let expires = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    ok(json!({
        "accessToken": token,
        "expireTime": humantime::format_rfc3339_seconds(expires).to_string(),
    }))
}

/// The key a request names (a CryptoKey, or for Encrypt one of its versions).
fn key_and_version<'a>(
    kms: &'a Kms,
    resource: &str,
) -> Result<(&'a CryptoKey, String, Option<u32>), Response> {
    let (key_name, version) = match split_version(resource) {
        Some((k, id)) => (k.to_owned(), Some(id)),
        None => (resource.to_owned(), None),
    };
    match kms.keys.get(&key_name) {
        Some(key) => Ok((key, key_name, version)),
        None if is_crypto_key(&key_name) => Err(not_found("CryptoKey", &key_name)),
        None => Err(invalid(format!("Invalid resource name {resource}"))),
    }
}

fn state_error(name: &str, state: &str) -> Response {
    precondition(format!(
        "The request cannot be fulfilled. Resource {name} has value {state} in field crypto_key_version.state."
    ))
}

fn sealing_key(material: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, material).unwrap())
}

const MAGIC: &[u8; 4] = b"fkms";

fn encrypt(kms: &mut Kms, principal: &str, resource: &str, body: &Value) -> Response {
    let (key, key_name, version) = match key_and_version(kms, resource) {
        Ok(found) => found,
        Err(response) => return response,
    };
    if !key.allows(principal, ENCRYPT_ROLES) {
        return denied("cloudkms.cryptoKeyVersions.useToEncrypt", resource);
    }
    if key.purpose != "ENCRYPT_DECRYPT" {
        return precondition(format!(
            "The request cannot be fulfilled. Resource {key_name} has value {} in field crypto_key.purpose.",
            key.purpose
        ));
    }
    let plaintext = match bytes_field(body, "plaintext") {
        Ok(p) => p,
        Err(r) => return r,
    };
    let aad = match bytes_field(body, "additionalAuthenticatedData") {
        Ok(a) => a,
        Err(r) => return r,
    };
    if plaintext.len() > 64 * 1024 || aad.len() > 64 * 1024 {
        return invalid("The plaintext or additional authenticated data is too large.");
    }
    let plaintext_crc = int64(body, "plaintextCrc32c");
    if plaintext_crc.is_some_and(|c| c != crc32c(&plaintext)) {
        return invalid(
            "The checksum in field plaintext_crc32c did not match the data in field plaintext.",
        );
    }
    let aad_crc = int64(body, "additionalAuthenticatedDataCrc32c");
    if aad_crc.is_some_and(|c| c != crc32c(&aad)) {
        return invalid(
            "The checksum in field additional_authenticated_data_crc32c did not match the data in field additional_authenticated_data.",
        );
    }
    let Some(id) = version.or(key.primary) else {
        return precondition(format!(
            "The request cannot be fulfilled. Resource {key_name} has no primary version."
        ));
    };
    let Some(v) = key.versions.get(&id) else {
        return not_found(
            "CryptoKeyVersion",
            &format!("{key_name}/cryptoKeyVersions/{id}"),
        );
    };
    let version_name = format!("{key_name}/cryptoKeyVersions/{id}");
    if v.state != "ENABLED" {
        return state_error(&version_name, v.state);
    }
    let nonce = random::<NONCE_LEN>();
    let mut sealed = plaintext;
    sealing_key(&v.material)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut sealed,
        )
        .unwrap();
    let mut ciphertext = MAGIC.to_vec();
    ciphertext.extend_from_slice(&id.to_be_bytes());
    ciphertext.extend_from_slice(&nonce);
    ciphertext.extend_from_slice(&sealed);
    let mut crc = crc32c(&ciphertext);
    let unverified = kms.faults.unverified_request;
    if kms.faults.corrupt_response_crc {
        crc ^= 1;
    }
    ok(json!({
        "name": version_name,
        "ciphertext": B64.encode(&ciphertext),
        "ciphertextCrc32c": crc.to_string(),
        "verifiedPlaintextCrc32c": plaintext_crc.is_some() && !unverified,
        "verifiedAdditionalAuthenticatedDataCrc32c": aad_crc.is_some() && !unverified,
        "protectionLevel": key.protection_level,
    }))
}

fn decrypt(kms: &mut Kms, principal: &str, resource: &str, body: &Value) -> Response {
    if split_version(resource).is_some() {
        return invalid("Decrypt takes a CryptoKey name, not a CryptoKeyVersion.");
    }
    let (key, key_name, _) = match key_and_version(kms, resource) {
        Ok(found) => found,
        Err(response) => return response,
    };
    if !key.allows(principal, DECRYPT_ROLES) {
        return denied("cloudkms.cryptoKeyVersions.useToDecrypt", resource);
    }
    let ciphertext = match bytes_field(body, "ciphertext") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let aad = match bytes_field(body, "additionalAuthenticatedData") {
        Ok(a) => a,
        Err(r) => return r,
    };
    if int64(body, "ciphertextCrc32c").is_some_and(|c| c != crc32c(&ciphertext)) {
        return invalid(
            "The checksum in field ciphertext_crc32c did not match the data in field ciphertext.",
        );
    }
    if int64(body, "additionalAuthenticatedDataCrc32c").is_some_and(|c| c != crc32c(&aad)) {
        return invalid(
            "The checksum in field additional_authenticated_data_crc32c did not match the data in field additional_authenticated_data.",
        );
    }
    let failed =
        || invalid("Decryption failed: verify that 'name' refers to the correct CryptoKey.");
    if ciphertext.len() < 4 + 4 + NONCE_LEN + 16 || &ciphertext[..4] != MAGIC {
        return failed();
    }
    let id = u32::from_be_bytes(ciphertext[4..8].try_into().unwrap());
    let Some(v) = key.versions.get(&id) else {
        return failed();
    };
    if v.state != "ENABLED" {
        return state_error(&format!("{key_name}/cryptoKeyVersions/{id}"), v.state);
    }
    let nonce: [u8; NONCE_LEN] = ciphertext[8..8 + NONCE_LEN].try_into().unwrap();
    let mut buf = ciphertext[8 + NONCE_LEN..].to_vec();
    let Ok(plaintext) = sealing_key(&v.material).open_in_place(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&aad),
        &mut buf,
    ) else {
        return failed();
    };
    let mut crc = crc32c(plaintext);
    if kms.faults.corrupt_response_crc {
        crc ^= 1;
    }
    ok(json!({
        "plaintext": B64.encode(&*plaintext),
        "plaintextCrc32c": crc.to_string(),
        "usedPrimary": key.primary == Some(id),
        "protectionLevel": key.protection_level,
    }))
}

/// Key administration in the fake through Google's own Rust client: what a
/// customer does in their project (create, rotate, disable, destroy, grant).
#[derive(Debug, Clone)]
pub(crate) struct CloudKmsAdmin {
    client: google_cloud_kms_v1::client::KeyManagementService,
}

pub(crate) const PARENT: &str = "projects/customer-project/locations/us-east1";

impl CloudKmsAdmin {
    pub(crate) async fn connect(url: &str) -> Self {
        let client = google_cloud_kms_v1::client::KeyManagementService::builder()
            .with_endpoint(url)
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
            .build()
            .await
            .unwrap();
        Self { client }
    }

    /// A new ENCRYPT_DECRYPT key (version 1 primary) in a new key ring.
    pub(crate) async fn create_key(&self, ring: &str, key: &str) -> String {
        self.create_key_with(ring, key, CryptoKeyPurpose::EncryptDecrypt)
            .await
    }

    pub(crate) async fn create_key_with(
        &self,
        ring: &str,
        key: &str,
        purpose: CryptoKeyPurpose,
    ) -> String {
        use google_cloud_kms_v1::model::{
            CryptoKey, CryptoKeyVersionTemplate, KeyRing, ProtectionLevel,
        };
        let ring_name = format!("{PARENT}/keyRings/{ring}");
        let exists = self
            .client
            .get_key_ring()
            .set_name(&ring_name)
            .send()
            .await
            .is_ok();
        if !exists {
            self.client
                .create_key_ring()
                .set_parent(PARENT)
                .set_key_ring_id(ring)
                .set_key_ring(KeyRing::new())
                .send()
                .await
                .unwrap();
        }
        let created = self
            .client
            .create_crypto_key()
            .set_parent(&ring_name)
            .set_crypto_key_id(key)
            .set_crypto_key(
                CryptoKey::new()
                    .set_purpose(purpose)
                    .set_rotation_period(google_cloud_wkt::Duration::clamp(90 * 86_400, 0))
                    .set_next_rotation_time(google_cloud_wkt::Timestamp::clamp(4_102_444_800, 0))
                    .set_version_template(
                        CryptoKeyVersionTemplate::new().set_protection_level(ProtectionLevel::Hsm),
                    ),
            )
            .send()
            .await
            .unwrap();
        created.name
    }

    /// Rotation: a new version, made primary. Returns its name.
    pub(crate) async fn rotate(&self, key: &str) -> String {
        use google_cloud_kms_v1::model::CryptoKeyVersion;
        let version = self
            .client
            .create_crypto_key_version()
            .set_parent(key)
            .set_crypto_key_version(CryptoKeyVersion::new())
            .send()
            .await
            .unwrap();
        let id = version.name.rsplit('/').next().unwrap().to_owned();
        let updated = self
            .client
            .update_crypto_key_primary_version()
            .set_name(key)
            .set_crypto_key_version_id(id)
            .send()
            .await
            .unwrap();
        assert_eq!(updated.primary.unwrap().name, version.name);
        version.name
    }

    pub(crate) async fn set_version_state(&self, version: &str, state: CryptoKeyVersionState) {
        use google_cloud_kms_v1::model::CryptoKeyVersion;
        let updated = self
            .client
            .update_crypto_key_version()
            .set_crypto_key_version(
                CryptoKeyVersion::new()
                    .set_name(version)
                    .set_state(state.clone()),
            )
            .set_update_mask(google_cloud_wkt::FieldMask::default().set_paths(["state"]))
            .send()
            .await
            .unwrap();
        assert_eq!(updated.state, state);
    }

    pub(crate) async fn destroy(&self, version: &str) {
        let destroyed = self
            .client
            .destroy_crypto_key_version()
            .set_name(version)
            .send()
            .await
            .unwrap();
        assert_eq!(destroyed.state, CryptoKeyVersionState::DestroyScheduled);
    }

    /// Sets the key's IAM policy: `members` get Encrypter/Decrypter.
    pub(crate) async fn grant_only(&self, key: &str, members: &[&str]) {
        use google_cloud_iam_v1::model::{Binding, Policy};
        let policy = self
            .client
            .set_iam_policy()
            .set_resource(key)
            .set_policy(
                Policy::new().set_bindings([Binding::new()
                    .set_role(keybroker::kms::gcp::ENCRYPTER_DECRYPTER_ROLE)
                    .set_members(members.iter().copied())]),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(policy.bindings[0].members.len(), members.len());
    }
}

pub(crate) use google_cloud_kms_v1::model::crypto_key::CryptoKeyPurpose;
pub(crate) use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionState;

/// Google's OAuth token endpoint for `authorized_user` credentials (the
/// `token_uri` of an ADC file): the refresh grant of `client_id` becomes an
/// access token of principal `serviceAccount:<client_id>`.
fn oauth_token(state: &Arc<Mutex<Kms>>, body: &[u8]) -> Response {
    // Google's Rust client posts JSON; other clients post a form.
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let form = String::from_utf8_lossy(body);
    let field = |name: &str| match &json {
        Some(j) => j[name].as_str().map(str::to_owned),
        None => form.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| percent_decode(v))
        }),
    };
    if field("grant_type").as_deref() != Some("refresh_token") || field("refresh_token").is_none() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    }
    let Some(client_id) = field("client_id") else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    };
    let token = format!("ya29.source-{}", hex::encode(random::<16>()));
    let mut kms = state.lock().unwrap();
    *kms.calls.entry("token".to_owned()).or_default() += 1;
    kms.tokens
        .insert(token.clone(), format!("serviceAccount:{client_id}"));
    ok(json!({ "access_token": token, "expires_in": 3600, "token_type": "Bearer" }))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// Stands in for the internet between keybroker and
/// `iamcredentials.googleapis.com`: an HTTPS proxy (`HTTPS_PROXY`) whose
/// CONNECT tunnels end at the fake, over TLS with a certificate for that
/// host from a test CA. A child process that trusts only that CA
/// (`SSL_CERT_FILE`) runs Google's real impersonation code unchanged.
#[derive(Debug)]
pub(crate) struct GoogleApisProxy {
    pub(crate) url: String,
    pub(crate) ca_pem: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for GoogleApisProxy {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// The host whose tunnels the proxy accepts.
pub(crate) const IAM_CREDENTIALS_HOST: &str = "iamcredentials.googleapis.com";

impl GoogleApisProxy {
    pub(crate) async fn start(fake: &FakeCloudKms) -> Self {
        use rustls_pki_types::pem::PemObject;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ca = crate::security::Ca::new("fake Google CA");
        let pem = ca.issue(
            &[rcgen::SanType::DnsName(
                IAM_CREDENTIALS_HOST.try_into().unwrap(),
            )],
            false,
        );
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(pem.cert.as_bytes())
            .map(|c| c.unwrap())
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let serving = tokio::spawn({
            let app = fake.router();
            async move {
                let _ = axum::serve(Tunnels(rx, addr), app).await;
            }
        });
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    // The CONNECT request head, byte by byte up to the blank line.
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if tcp.read_exact(&mut byte).await.is_err() || head.len() > 8192 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head);
                    if !head.starts_with(&format!("CONNECT {IAM_CREDENTIALS_HOST}:443 ")) {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                    if tcp
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = tx.send(tls).await;
                    }
                });
            }
        });
        Self {
            url: format!("http://{addr}"),
            ca_pem: ca.pem(),
            tasks: vec![serving, accepting],
        }
    }
}

/// TLS streams out of CONNECT tunnels, as an axum listener.
struct Tunnels(
    tokio::sync::mpsc::Receiver<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    SocketAddr,
);

impl axum::serve::Listener for Tunnels {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.recv().await {
            Some(io) => (io, self.1),
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.1)
    }
}
