//! Crypto key versions: create, enable/disable, schedule and cancel
//! destruction.

use axum::http::Uri;
use axum::response::Response;
use serde_json::Value;

use super::*;

pub(super) fn create(kms: &mut Kms, resource: &str) -> Response {
    let key_name = resource.trim_end_matches("/cryptoKeyVersions").to_owned();
    let Some(key) = kms.keys.get_mut(&key_name) else {
        return not_found("CryptoKey", &key_name);
    };
    let id = key.add_version();
    ok(key.version_json(&key_name, id))
}

/// PATCH with `updateMask=state`: enable or disable a version.
pub(super) fn set_state(kms: &mut Kms, uri: &Uri, resource: &str, body: &Value) -> Response {
    let Some((key_name, id)) = split_version(resource) else {
        return invalid("only CryptoKeyVersion updates are implemented");
    };
    let key_name = key_name.to_owned();
    let Some(key) = kms.keys.get_mut(&key_name) else {
        return not_found("CryptoKey", &key_name);
    };
    let Some(v) = key.versions.get_mut(&id) else {
        return not_found("CryptoKeyVersion", resource);
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

/// `:destroy` (schedule) or `:restore` (cancel a scheduled destruction).
pub(super) fn destroy_or_restore(kms: &mut Kms, verb: &str, resource: &str) -> Response {
    let Some((key_name, id)) = split_version(resource) else {
        return invalid(format!("Invalid resource name {resource}"));
    };
    let Some(key) = kms.keys.get_mut(key_name) else {
        return not_found("CryptoKey", key_name);
    };
    let Some(v) = key.versions.get_mut(&id) else {
        return not_found("CryptoKeyVersion", resource);
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
