//! IAM on crypto keys (`setIamPolicy`, `getIamPolicy`), service-account
//! impersonation (`generateAccessToken`) and the OAuth token endpoint.

use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::*;

pub(super) fn set_policy(kms: &mut Kms, resource: &str, body: &Value) -> Response {
    let Some(key) = kms.keys.get_mut(resource) else {
        return not_found("CryptoKey", resource);
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

pub(super) fn get_policy(kms: &Kms, resource: &str) -> Response {
    match kms.keys.get(resource) {
        Some(key) => ok(iam_json(key)),
        None => not_found("CryptoKey", resource),
    }
}

pub(super) fn iam_json(key: &CryptoKey) -> Value {
    let bindings: Vec<Value> = key
        .iam
        .iter()
        .map(|(role, members)| json!({ "role": role, "members": members }))
        .collect();
    json!({ "version": 1, "etag": B64.encode(key.etag.to_be_bytes()), "bindings": bindings })
}

pub(super) fn generate_access_token(kms: &mut Kms, principal: &str, resource: &str) -> Response {
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

/// Google's OAuth token endpoint for `authorized_user` credentials (the
/// `token_uri` of an ADC file): the refresh grant of `client_id` becomes an
/// access token of principal `serviceAccount:<client_id>`.
pub(super) fn oauth_token(state: &Arc<Mutex<Kms>>, body: &[u8]) -> Response {
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
