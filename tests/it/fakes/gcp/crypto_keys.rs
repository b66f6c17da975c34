//! Key rings and crypto keys: create, get, rotate the primary.

use std::collections::BTreeMap;

use axum::http::{StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use super::*;

pub(super) fn create_key_ring(kms: &mut Kms, uri: &Uri, resource: &str) -> Response {
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

pub(super) fn create_crypto_key(
    kms: &mut Kms,
    uri: &Uri,
    resource: &str,
    body: &Value,
) -> Response {
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
    let labels = match labels(body) {
        Ok(labels) => labels,
        Err(response) => return *response,
    };
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
        labels,
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

/// UpdateCryptoKey (PATCH), of the fields keybroker's customers change:
/// `labels` (a whole new map, as Google replaces it).
pub(super) fn update(kms: &mut Kms, uri: &Uri, resource: &str, body: &Value) -> Response {
    let Some(key) = kms.keys.get_mut(resource) else {
        return not_found("CryptoKey", resource);
    };
    if query(uri, "updateMask").as_deref() != Some("labels") {
        return invalid("The request cannot be fulfilled. update_mask must be \"labels\".");
    }
    match labels(body) {
        Ok(labels) => key.labels = labels,
        Err(response) => return *response,
    }
    ok(key.json(resource))
}

/// A request's `labels`, checked as Cloud KMS does: keys start with a
/// lower-case letter, keys and values are at most 63 lower-case letters,
/// digits, `_` and `-`.
fn labels(body: &Value) -> Result<BTreeMap<String, String>, Box<Response>> {
    let mut out = BTreeMap::new();
    let Some(map) = body["labels"].as_object() else {
        return Ok(out);
    };
    let allowed = |s: &str| {
        s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    for (k, v) in map {
        let v = v.as_str().unwrap_or_default();
        if !k.starts_with(|c: char| c.is_ascii_lowercase()) || !allowed(k) || !allowed(v) {
            return Err(Box::new(invalid(format!("Invalid label {k}={v}"))));
        }
        out.insert(k.clone(), v.to_owned());
    }
    Ok(out)
}

pub(super) fn update_primary(kms: &mut Kms, resource: &str, body: &Value) -> Response {
    let Some(key) = kms.keys.get_mut(resource) else {
        return not_found("CryptoKey", resource);
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
    ok(key.json(resource))
}

/// GET of a key ring, a crypto key or a version.
pub(super) fn get(kms: &mut Kms, principal: &str, resource: &str) -> Response {
    *kms.calls.entry("get".to_owned()).or_default() += 1;
    if let Some(created) = kms.key_rings.get(resource) {
        return ok(json!({ "name": resource, "createTime": created }));
    }
    if let Some((key_name, id)) = split_version(resource) {
        return match kms.keys.get(key_name) {
            Some(key) if key.versions.contains_key(&id) => ok(key.version_json(key_name, id)),
            _ => not_found("CryptoKeyVersion", resource),
        };
    }
    match kms.keys.get(resource) {
        Some(key) if !key.allows(principal, VIEW_ROLES) => {
            denied("cloudkms.cryptoKeys.get", resource)
        }
        Some(key) => ok(key.json(resource)),
        None if is_crypto_key(resource) => not_found("CryptoKey", resource),
        None => not_found("Resource", resource),
    }
}
