//! A fake Azure Key Vault and Entra ID, served under their real host names
//! (`login.microsoftonline.com`, `*.vault.azure.net`,
//! `*.managedhsm.azure.net`) through a CONNECT tunnel with a test CA, so
//! Microsoft's Rust and Python SDKs run unchanged against it.
//!
//! No emulator of Key Vault exists; this one implements what keybroker
//! relies on, with Key Vault's own semantics and error shapes:
//! - Entra's token endpoint per tenant (`/{tenant}/oauth2/v2.0/token`,
//!   client credentials with a secret or a client assertion): unknown
//!   tenant → AADSTS90002, application not consented in the tenant →
//!   AADSTS700016, wrong secret → AADSTS7000215;
//! - the challenge: a request without a token gets 401 with
//!   `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<vault tenant>", resource="https://vault.azure.net"`;
//!   a token of another tenant gets 401 (AKV10032, invalid issuer);
//! - RBAC per principal (the application id in the token) per vault: 403
//!   ForbiddenByRbac without a role assignment;
//! - keys (RSA 2048, and `oct-HSM` AES-256 on Managed HSM), versions
//!   (create, rotate: a new current version; old versions still unwrap),
//!   enable/disable per version, `exp`/`nbf`, key_ops;
//! - wrapkey/unwrapkey with RSA-OAEP-256 (real OAEP, aws-lc-rs) and A256KW;
//!   `kid` names the version used; a disabled key → 403 KeyDisabled; bad
//!   ciphertext → 400 BadParameter;
//! - soft delete (404 KeyNotFound with Key Vault's recovery hint; the key
//!   appears under `/deletedkeys`), recover, purge protection
//!   (`recoveryLevel`);
//! - throttling: 429 Throttled with `Retry-After`;
//! - errors as `{"error": {"code", "message", "innererror": {"code"}}}`.
//!
//! `tests/it/azure.rs` proves the fidelity with Microsoft's Python SDK.

// The fake's errors are its HTTP responses, returned as they are.
#![allow(clippy::result_large_err)]

mod jwk;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD as B64URL};
use serde_json::{Value, json};

use self::jwk::RsaKey;
use crate::fakes::tunnel::Tunnel;

pub(crate) const LOGIN_HOST: &str = "login.microsoftonline.com";
const RESOURCE: &str = "https://vault.azure.net";
const MHSM_RESOURCE: &str = "https://managedhsm.azure.net";

/// A random GUID (tenants, applications).
pub(crate) fn random_guid() -> String {
    uuid()
}

/// The platform's multi-tenant application as registered in Entra.
#[derive(Debug, Clone)]
pub(crate) struct App {
    pub(crate) client_id: String,
    pub(crate) secret: String,
}

enum Material {
    Rsa(RsaKey),
    Aes([u8; 32]),
}

struct Version {
    id: String,
    material: Material,
    enabled: bool,
    exp: Option<i64>,
    nbf: Option<i64>,
    created: i64,
}

struct Key {
    versions: Vec<Version>,
    key_ops: Vec<String>,
    /// The key's tags (keybroker reads `keybroker-tenant`). Key Vault keeps
    /// them per version; the fake keeps one set for the key.
    tags: serde_json::Map<String, Value>,
}

struct Vault {
    /// The Entra tenant the vault belongs to.
    tenant: String,
    purge_protection: bool,
    keys: HashMap<String, Key>,
    deleted: HashMap<String, Key>,
    /// Principals (application ids) holding a crypto role on the vault.
    roles: HashSet<String>,
    hsm: bool,
}

#[derive(Default)]
struct Directory {
    /// Applications consented in (with a service principal in) the tenant.
    consented: HashSet<String>,
}

/// Calls seen, by kind (tests assert exact counts).
#[derive(Debug, Default)]
pub(crate) struct Calls {
    pub(crate) tokens: AtomicU64,
    pub(crate) wraps: AtomicU64,
    pub(crate) unwraps: AtomicU64,
    pub(crate) gets: AtomicU64,
    pub(crate) challenges: AtomicU64,
}

#[derive(Default)]
struct Fake {
    apps: Vec<App>,
    tenants: HashMap<String, Directory>,
    vaults: HashMap<String, Vault>,
    /// Issued access tokens → (tenant, application id).
    tokens: HashMap<String, (String, String)>,
    /// The next N Key Vault calls answer 429 with this Retry-After.
    throttle: u32,
    retry_after: u64,
    /// `x-ms-request-id` of every authorized Key Vault answer.
    request_ids: Vec<String>,
}

pub(crate) struct FakeAzure {
    state: Arc<Mutex<Fake>>,
    pub(crate) calls: Arc<Calls>,
    pub(crate) tunnel: Tunnel,
}

impl std::fmt::Debug for FakeAzure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAzure")
            .field("proxy", &self.tunnel.url)
            .finish()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    hex::encode(b)
}

impl FakeAzure {
    pub(crate) async fn start() -> Self {
        let state = Arc::new(Mutex::new(Fake::default()));
        let calls = Arc::new(Calls::default());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state((Arc::clone(&state), Arc::clone(&calls)));
        let tunnel = Tunnel::start(
            "fake Azure CA",
            &[LOGIN_HOST, "*.vault.azure.net", "*.managedhsm.azure.net"],
            app,
        )
        .await;
        Self {
            state,
            calls,
            tunnel,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Fake) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Registers the platform's multi-tenant application.
    pub(crate) fn register_app(&self) -> App {
        let app = App {
            client_id: uuid(),
            secret: random_hex(16),
        };
        self.with(|f| f.apps.push(app.clone()));
        app
    }

    /// A customer's Entra tenant; its id.
    pub(crate) fn add_tenant(&self) -> String {
        let id = uuid();
        self.with(|f| f.tenants.insert(id.clone(), Directory::default()));
        id
    }

    /// The tenant's admin consents to the application.
    pub(crate) fn consent(&self, tenant: &str, client_id: &str) {
        self.with(|f| {
            f.tenants
                .get_mut(tenant)
                .unwrap()
                .consented
                .insert(client_id.to_owned())
        });
    }

    /// A vault (`https://<name>.vault.azure.net`, or a Managed HSM) in a
    /// tenant.
    pub(crate) fn add_vault(&self, name: &str, tenant: &str, purge_protection: bool, hsm: bool) {
        self.with(|f| {
            f.vaults.insert(
                name.to_owned(),
                Vault {
                    tenant: tenant.to_owned(),
                    purge_protection,
                    keys: HashMap::new(),
                    deleted: HashMap::new(),
                    roles: HashSet::new(),
                    hsm,
                },
            )
        });
    }

    /// Assigns "Key Vault Crypto Service Encryption User" to a principal.
    pub(crate) fn grant(&self, vault: &str, client_id: &str) {
        self.with(|f| {
            f.vaults
                .get_mut(vault)
                .unwrap()
                .roles
                .insert(client_id.to_owned())
        });
    }

    pub(crate) fn revoke_role(&self, vault: &str, client_id: &str) {
        self.with(|f| f.vaults.get_mut(vault).unwrap().roles.remove(client_id));
    }

    /// A new key (RSA, or AES on a Managed HSM); its first version id.
    pub(crate) fn create_key(&self, vault: &str, name: &str) -> String {
        self.with(|f| create_key(f, vault, name, None, serde_json::Map::new()))
    }

    /// What proves the key is the tenant's: the customer tags it
    /// `keybroker-tenant=<the tenant's external id>`.
    pub(crate) fn tag_owner(&self, vault: &str, name: &str, external_id: &str) {
        self.with(|f| {
            let key = f.vaults.get_mut(vault).unwrap().keys.get_mut(name).unwrap();
            key.tags
                .insert("keybroker-tenant".into(), json!(external_id));
        });
    }

    /// A new current version of the key; its id.
    pub(crate) fn rotate(&self, vault: &str, name: &str) -> String {
        self.with(|f| {
            let hsm = f.vaults[vault].hsm;
            let key = f.vaults.get_mut(vault).unwrap().keys.get_mut(name).unwrap();
            let version = new_version(hsm);
            let id = version.id.clone();
            key.versions.push(version);
            id
        })
    }

    /// Enables or disables the key's current version.
    pub(crate) fn set_enabled(&self, vault: &str, name: &str, enabled: bool) {
        self.with(|f| {
            let key = f.vaults.get_mut(vault).unwrap().keys.get_mut(name).unwrap();
            key.versions.last_mut().unwrap().enabled = enabled;
        });
    }

    pub(crate) fn soft_delete(&self, vault: &str, name: &str) {
        self.with(|f| {
            let v = f.vaults.get_mut(vault).unwrap();
            let key = v.keys.remove(name).unwrap();
            v.deleted.insert(name.to_owned(), key);
        });
    }

    pub(crate) fn recover(&self, vault: &str, name: &str) {
        self.with(|f| {
            let v = f.vaults.get_mut(vault).unwrap();
            let key = v.deleted.remove(name).unwrap();
            v.keys.insert(name.to_owned(), key);
        });
    }

    /// The next `n` Key Vault calls answer 429 with `Retry-After: secs`.
    pub(crate) fn throttle(&self, n: u32, secs: u64) {
        self.with(|f| {
            f.throttle = n;
            f.retry_after = secs;
        });
    }

    /// Whether Key Vault answered a call with this request id.
    pub(crate) fn answered(&self, request_id: &str) -> bool {
        self.with(|f| f.request_ids.iter().any(|id| id == request_id))
    }

    /// The current version's private JWK (what only the key's owner has).
    pub(crate) fn private_jwk(&self, vault: &str, name: &str) -> Value {
        self.with(|f| {
            let key = &f.vaults[vault].keys[name];
            let version = key.versions.last().unwrap();
            match &version.material {
                Material::Rsa(rsa) => {
                    rsa.private_jwk(&kid(vault, f.vaults[vault].hsm, name, &version.id))
                }
                Material::Aes(_) => panic!("an AES key has no JWK export here"),
            }
        })
    }

    /// `https://<vault>.vault.azure.net` (or `.managedhsm.azure.net`).
    pub(crate) fn vault_url(&self, vault: &str) -> String {
        self.with(|f| base_url(vault, f.vaults[vault].hsm))
    }
}

fn uuid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn base_url(vault: &str, hsm: bool) -> String {
    if hsm {
        format!("https://{vault}.managedhsm.azure.net")
    } else {
        format!("https://{vault}.vault.azure.net")
    }
}

fn kid(vault: &str, hsm: bool, name: &str, version: &str) -> String {
    format!("{}/keys/{name}/{version}", base_url(vault, hsm))
}

fn new_version(hsm: bool) -> Version {
    let material = if hsm {
        let mut k = [0u8; 32];
        aws_lc_rs::rand::fill(&mut k).unwrap();
        Material::Aes(k)
    } else {
        Material::Rsa(RsaKey::generate())
    };
    Version {
        id: random_hex(16),
        material,
        enabled: true,
        exp: None,
        nbf: None,
        created: now(),
    }
}

fn create_key(
    f: &mut Fake,
    vault: &str,
    name: &str,
    ops: Option<Vec<String>>,
    tags: serde_json::Map<String, Value>,
) -> String {
    let v = f.vaults.get_mut(vault).unwrap();
    let version = new_version(v.hsm);
    let id = version.id.clone();
    let key_ops = ops.unwrap_or_else(|| {
        ["encrypt", "decrypt", "wrapKey", "unwrapKey"]
            .map(String::from)
            .to_vec()
    });
    v.keys.insert(
        name.to_owned(),
        Key {
            versions: vec![version],
            key_ops,
            tags,
        },
    );
    id
}

fn kv_error(status: StatusCode, code: &str, inner: Option<&str>, message: &str) -> Response {
    let mut error = json!({ "code": code, "message": message });
    if let Some(inner) = inner {
        error["innererror"] = json!({ "code": inner });
    }
    (status, axum::Json(json!({ "error": error }))).into_response()
}

fn not_found(name: &str) -> Response {
    kv_error(
        StatusCode::NOT_FOUND,
        "KeyNotFound",
        None,
        &format!(
            "A key with (name/id) {name} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
        ),
    )
}

fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let trimmed = text.trim_end_matches('=');
    B64URL
        .decode(trimmed)
        .ok()
        .or_else(|| URL_SAFE.decode(text).ok())
}

type AppState = (Arc<Mutex<Fake>>, Arc<Calls>);

async fn handle(
    State((state, calls)): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let mut fake = state.lock().unwrap();
    if host == LOGIN_HOST {
        return match method {
            Method::GET => discovery(&fake, uri.path()),
            _ => token(&mut fake, &calls, uri.path(), &body),
        };
    }
    let (vault_name, hsm) = match host.split_once('.') {
        Some((name, "vault.azure.net")) => (name.to_owned(), false),
        Some((name, "managedhsm.azure.net")) => (name.to_owned(), true),
        _ => return (StatusCode::NOT_FOUND, "no such host").into_response(),
    };
    let Some(vault_tenant) = fake
        .vaults
        .get(&vault_name)
        .filter(|v| v.hsm == hsm)
        .map(|v| v.tenant.clone())
    else {
        return (StatusCode::NOT_FOUND, "no such vault").into_response();
    };
    // The challenge: Key Vault answers an unauthenticated request with the
    // tenant and resource to get a token for.
    let bearer = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let Some(bearer) = bearer else {
        calls.challenges.fetch_add(1, Ordering::Relaxed);
        let resource = if hsm { MHSM_RESOURCE } else { RESOURCE };
        let mut response = kv_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            None,
            "AKV10000: Request is missing a Bearer or PoP token.",
        );
        response.headers_mut().insert(
            "www-authenticate",
            format!("Bearer authorization=\"https://{LOGIN_HOST}/{vault_tenant}\", resource=\"{resource}\"")
                .parse()
                .unwrap(),
        );
        return response;
    };
    let Some((token_tenant, principal)) = fake.tokens.get(bearer).cloned() else {
        return kv_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            None,
            "AKV10022: Invalid audience.",
        );
    };
    if token_tenant != vault_tenant {
        return kv_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            Some("AKV10032"),
            &format!(
                "AKV10032: Invalid issuer. Expected one of https://sts.windows.net/{vault_tenant}/, found https://sts.windows.net/{token_tenant}/."
            ),
        );
    }
    // The fake's own control (the tenant's administrator only): throttle
    // the next calls, so a client in another process can test Retry-After.
    if uri.path() == "/_fake/throttle" && principal == "admin" {
        let query: HashMap<String, String> =
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        fake.throttle = query.get("n").and_then(|n| n.parse().ok()).unwrap_or(1);
        fake.retry_after = query.get("secs").and_then(|s| s.parse().ok()).unwrap_or(1);
        return StatusCode::NO_CONTENT.into_response();
    }
    if fake.throttle > 0 {
        fake.throttle -= 1;
        let mut response = kv_error(
            StatusCode::TOO_MANY_REQUESTS,
            "Throttled",
            None,
            "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached",
        );
        response
            .headers_mut()
            .insert("retry-after", fake.retry_after.to_string().parse().unwrap());
        return response;
    }
    let api = uri.query().unwrap_or_default();
    if !api.contains("api-version=") {
        return kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            None,
            "The api-version query parameter is missing.",
        );
    }
    // The customer's own administrator manages keys; an application needs
    // the crypto role, which allows get, wrapKey and unwrapKey only.
    let admin = principal == "admin";
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let crypto_use = matches!(
        (method.as_str(), segments.as_slice()),
        ("GET", ["keys", ..]) | ("POST", ["keys", .., "wrapkey" | "unwrapkey"])
    );
    let permitted = admin || (crypto_use && fake.vaults[&vault_name].roles.contains(&principal));
    if !permitted {
        return kv_error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            Some("ForbiddenByRbac"),
            &format!(
                "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: appid={principal};\r\nAction: 'Microsoft.KeyVault/vaults/keys/wrap/action'"
            ),
        );
    }
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                return kv_error(
                    StatusCode::BAD_REQUEST,
                    "BadParameter",
                    None,
                    "The request body is not JSON.",
                );
            }
        }
    };
    let mut response = keys_api(
        &mut fake,
        &calls,
        &vault_name,
        hsm,
        &method,
        &segments,
        &body,
    );
    // Key Vault names every answer for its logs.
    let request_id = uuid();
    response
        .headers_mut()
        .insert("x-ms-request-id", request_id.parse().unwrap());
    fake.request_ids.push(request_id);
    response
}

/// Entra's metadata, as MSAL (Python) reads it before a token request:
/// instance discovery and a tenant's OpenID configuration.
fn discovery(fake: &Fake, path: &str) -> Response {
    let base = format!("https://{LOGIN_HOST}");
    if path == "/common/discovery/instance" {
        return axum::Json(json!({
            "tenant_discovery_endpoint": format!("{base}/{{tenant}}/v2.0/.well-known/openid-configuration"),
            "api-version": "1.1",
            "metadata": [{"preferred_network": LOGIN_HOST, "preferred_cache": LOGIN_HOST, "aliases": [LOGIN_HOST]}],
        }))
        .into_response();
    }
    let Some(tenant) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix("/v2.0/.well-known/openid-configuration"))
    else {
        return (StatusCode::NOT_FOUND, "unknown Entra path").into_response();
    };
    if !fake.tenants.contains_key(tenant) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_tenant", "error_description": format!("AADSTS90002: Tenant '{tenant}' not found.")})),
        )
            .into_response();
    }
    axum::Json(json!({
        "token_endpoint": format!("{base}/{tenant}/oauth2/v2.0/token"),
        "authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/authorize"),
        "device_authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/devicecode"),
        "issuer": format!("{base}/{tenant}/v2.0"),
        "jwks_uri": format!("{base}/{tenant}/discovery/v2.0/keys"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "tenant_region_scope": "EU",
    }))
    .into_response()
}

/// Entra's token endpoint of one tenant.
fn token(fake: &mut Fake, calls: &Calls, path: &str, body: &[u8]) -> Response {
    calls.tokens.fetch_add(1, Ordering::Relaxed);
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let entra_error = |status: StatusCode, error: &str, description: String| {
        (
            status,
            axum::Json(json!({
                "error": error,
                "error_description": description,
                "error_codes": [description.split(':').next().unwrap_or_default().trim_start_matches("AADSTS").parse::<u64>().unwrap_or(0)],
                "timestamp": "2026-12-02 10:00:00Z",
                "trace_id": uuid(),
                "correlation_id": uuid(),
            })),
        )
            .into_response()
    };
    let Some(tenant) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix("/oauth2/v2.0/token"))
    else {
        return (StatusCode::NOT_FOUND, "not a token endpoint").into_response();
    };
    let Some(directory) = fake.tenants.get(tenant) else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            format!(
                "AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
    };
    let client_id = form.get("client_id").cloned().unwrap_or_default();
    // The customer's administrator: the tenant's own user (tests sign in
    // as it with client_id "admin").
    if client_id == "admin" {
        let token = random_hex(24);
        fake.tokens
            .insert(token.clone(), (tenant.to_owned(), "admin".into()));
        return axum::Json(json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token})).into_response();
    }
    let Some(app) = fake.apps.iter().find(|a| a.client_id == client_id).cloned() else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            format!(
                "AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."
            ),
        );
    };
    let proved = match (form.get("client_secret"), form.get("client_assertion")) {
        (Some(secret), None) => *secret == app.secret,
        (None, Some(assertion)) => *assertion == format!("assertion-for-{}", app.client_id),
        _ => false,
    };
    if !proved {
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            format!(
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
            ),
        );
    }
    if !directory.consented.contains(&client_id) {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            format!(
                "AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."
            ),
        );
    }
    let scope = form.get("scope").cloned().unwrap_or_default();
    if scope != "https://vault.azure.net/.default"
        && scope != "https://managedhsm.azure.net/.default"
    {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!(
                "AADSTS70011: The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
            ),
        );
    }
    let token = random_hex(24);
    fake.tokens
        .insert(token.clone(), (tenant.to_owned(), client_id.clone()));
    axum::Json(json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}))
        .into_response()
}

fn key_bundle(vault: &str, v: &Vault, name: &str, key: &Key, version: &Version) -> Value {
    let mut jwk = json!({
        "kid": kid(vault, v.hsm, name, &version.id),
        "kty": if v.hsm { "oct-HSM" } else { "RSA" },
        "key_ops": key.key_ops,
    });
    if let Material::Rsa(rsa) = &version.material {
        let (n, e) = rsa.public_jwk();
        jwk["n"] = n;
        jwk["e"] = e;
    }
    let mut attributes = json!({
        "enabled": version.enabled,
        "created": version.created,
        "updated": version.created,
        "recoveryLevel": if v.purge_protection { "Recoverable" } else { "Recoverable+Purgeable" },
        "recoverableDays": 90,
        "exportable": false,
    });
    if let Some(exp) = version.exp {
        attributes["exp"] = json!(exp);
    }
    if let Some(nbf) = version.nbf {
        attributes["nbf"] = json!(nbf);
    }
    let mut bundle = json!({ "key": jwk, "attributes": attributes });
    if !key.tags.is_empty() {
        bundle["tags"] = Value::Object(key.tags.clone());
    }
    bundle
}

/// The current version of a live key, as Key Vault returns it.
fn current_bundle(fake: &Fake, vault: &str, name: &str) -> Response {
    let v = &fake.vaults[vault];
    let key = &v.keys[name];
    axum::Json(key_bundle(
        vault,
        v,
        name,
        key,
        key.versions.last().unwrap(),
    ))
    .into_response()
}

fn keys_api(
    fake: &mut Fake,
    calls: &Calls,
    vault_name: &str,
    hsm: bool,
    method: &Method,
    segments: &[&str],
    body: &Value,
) -> Response {
    match (method.as_str(), segments) {
        // Create (the customer's administrator, or Python's KeyClient).
        ("POST", ["keys", name, "create"]) => {
            let ops = body["key_ops"].as_array().map(|ops| {
                ops.iter()
                    .filter_map(|o| o.as_str().map(String::from))
                    .collect()
            });
            let tags = body["tags"].as_object().cloned().unwrap_or_default();
            create_key(fake, vault_name, name, ops, tags);
            current_bundle(fake, vault_name, name)
        }
        ("POST", ["keys", name, "rotate"]) => {
            let v = fake.vaults.get_mut(vault_name).unwrap();
            let Some(key) = v.keys.get_mut(*name) else {
                return not_found(name);
            };
            key.versions.push(new_version(hsm));
            current_bundle(fake, vault_name, name)
        }
        ("GET", ["keys", name]) | ("GET", ["keys", name, ""]) => {
            calls.gets.fetch_add(1, Ordering::Relaxed);
            let v = &fake.vaults[vault_name];
            let Some(key) = v.keys.get(*name) else {
                return not_found(name);
            };
            axum::Json(key_bundle(
                vault_name,
                v,
                name,
                key,
                key.versions.last().unwrap(),
            ))
            .into_response()
        }
        ("GET", ["keys", name, version]) => {
            calls.gets.fetch_add(1, Ordering::Relaxed);
            let v = &fake.vaults[vault_name];
            let Some(key) = v.keys.get(*name) else {
                return not_found(name);
            };
            let Some(found) = key.versions.iter().find(|x| x.id == *version) else {
                return not_found(&format!("{name}/{version}"));
            };
            axum::Json(key_bundle(vault_name, v, name, key, found)).into_response()
        }
        ("PATCH", ["keys", name, version]) | ("PATCH", ["keys", name, version, ""]) => {
            let v = fake.vaults.get_mut(vault_name).unwrap();
            let Some(key) = v.keys.get_mut(*name) else {
                return not_found(name);
            };
            let target = if version.is_empty() {
                key.versions.last_mut()
            } else {
                key.versions.iter_mut().find(|x| x.id == *version)
            };
            let Some(target) = target else {
                return not_found(name);
            };
            let attributes = &body["attributes"];
            if let Some(enabled) = attributes["enabled"].as_bool() {
                target.enabled = enabled;
            }
            if let Some(exp) = attributes["exp"].as_i64() {
                target.exp = Some(exp);
            }
            if let Some(nbf) = attributes["nbf"].as_i64() {
                target.nbf = Some(nbf);
            }
            let id = target.id.clone();
            if let Some(tags) = body["tags"].as_object() {
                key.tags = tags.clone();
            }
            let v = &fake.vaults[vault_name];
            let key = &v.keys[*name];
            let version = key.versions.iter().find(|x| x.id == id).unwrap();
            axum::Json(key_bundle(vault_name, v, name, key, version)).into_response()
        }
        ("DELETE", ["keys", name]) => {
            let v = fake.vaults.get_mut(vault_name).unwrap();
            let Some(key) = v.keys.remove(*name) else {
                return not_found(name);
            };
            v.deleted.insert((*name).to_owned(), key);
            let v = &fake.vaults[vault_name];
            let key = &v.deleted[*name];
            let mut bundle = key_bundle(vault_name, v, name, key, key.versions.last().unwrap());
            bundle["recoveryId"] =
                json!(format!("{}/deletedkeys/{name}", base_url(vault_name, hsm)));
            bundle["deletedDate"] = json!(now());
            bundle["scheduledPurgeDate"] = json!(now() + 90 * 86400);
            axum::Json(bundle).into_response()
        }
        ("GET", ["deletedkeys", name]) => {
            let v = &fake.vaults[vault_name];
            let Some(key) = v.deleted.get(*name) else {
                return kv_error(
                    StatusCode::NOT_FOUND,
                    "KeyNotFound",
                    None,
                    &format!("Deleted Key not found: {name}"),
                );
            };
            let mut bundle = key_bundle(vault_name, v, name, key, key.versions.last().unwrap());
            bundle["recoveryId"] =
                json!(format!("{}/deletedkeys/{name}", base_url(vault_name, hsm)));
            axum::Json(bundle).into_response()
        }
        ("POST", ["deletedkeys", name, "recover"]) => {
            let v = fake.vaults.get_mut(vault_name).unwrap();
            let Some(key) = v.deleted.remove(*name) else {
                return kv_error(
                    StatusCode::NOT_FOUND,
                    "KeyNotFound",
                    None,
                    &format!("Deleted Key not found: {name}"),
                );
            };
            v.keys.insert((*name).to_owned(), key);
            current_bundle(fake, vault_name, name)
        }
        ("POST", ["keys", name, .., op @ ("wrapkey" | "unwrapkey")]) => {
            let version = if segments.len() == 4 { segments[2] } else { "" };
            let wrap = *op == "wrapkey";
            if wrap {
                calls.wraps.fetch_add(1, Ordering::Relaxed);
            } else {
                calls.unwraps.fetch_add(1, Ordering::Relaxed);
            }
            let v = &fake.vaults[vault_name];
            let Some(key) = v.keys.get(*name) else {
                return not_found(name);
            };
            let found = if version.is_empty() {
                key.versions.last()
            } else {
                key.versions.iter().find(|x| x.id == version)
            };
            let Some(found) = found else {
                return not_found(&format!("{name}/{version}"));
            };
            let op_name = if wrap { "wrapKey" } else { "unwrapKey" };
            if !found.enabled {
                return kv_error(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    Some("KeyDisabled"),
                    &format!("Operation {op_name} is not allowed on a disabled key."),
                );
            }
            if found.exp.is_some_and(|exp| exp <= now()) {
                return kv_error(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    Some("KeyExpired"),
                    &format!("Operation {op_name} is not allowed on an expired key."),
                );
            }
            if found.nbf.is_some_and(|nbf| nbf > now()) {
                return kv_error(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    Some("KeyNotYetValid"),
                    &format!("Operation {op_name} is not allowed on a key that is not yet valid."),
                );
            }
            if !key.key_ops.iter().any(|o| o == op_name) {
                return kv_error(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    Some("KeyOperationForbidden"),
                    &format!("Operation {op_name} is not permitted on this key."),
                );
            }
            let alg = body["alg"].as_str().unwrap_or_default();
            let Some(value) = body["value"].as_str().and_then(b64_decode) else {
                return kv_error(
                    StatusCode::BAD_REQUEST,
                    "BadParameter",
                    None,
                    "Property 'value' is required.",
                );
            };
            let result = match (&found.material, alg) {
                (Material::Rsa(rsa), "RSA-OAEP-256") => {
                    if wrap {
                        Some(rsa.wrap(&value))
                    } else {
                        rsa.unwrap(&value)
                    }
                }
                (Material::Aes(k), "A256KW") => {
                    use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrap};
                    let kek = AesKek::new(&AES_256, k).unwrap();
                    let mut out = vec![0u8; value.len() + 8];
                    if wrap {
                        kek.wrap(&value, &mut out).ok().map(|r| r.to_vec())
                    } else {
                        kek.unwrap(&value, &mut out).ok().map(|r| r.to_vec())
                    }
                }
                _ => {
                    return kv_error(
                        StatusCode::BAD_REQUEST,
                        "BadParameter",
                        None,
                        &format!("Algorithm {alg} is not supported for this key type."),
                    );
                }
            };
            let Some(result) = result else {
                return kv_error(
                    StatusCode::BAD_REQUEST,
                    "BadParameter",
                    None,
                    "The parameter is incorrect.\r\n",
                );
            };
            axum::Json(json!({
                "kid": kid(vault_name, hsm, name, &found.id),
                "value": B64URL.encode(result),
            }))
            .into_response()
        }
        _ => kv_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            None,
            &format!(
                "{} /{} is not supported by the fake",
                method,
                segments.join("/")
            ),
        ),
    }
}
