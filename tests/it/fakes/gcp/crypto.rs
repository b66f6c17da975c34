//! Encrypt and Decrypt: AES-256-GCM under the key's versions, with AAD and
//! CRC32C integrity fields both ways.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use keybroker::kms::gcp::crc32c;

use super::*;

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

pub(super) fn encrypt(kms: &mut Kms, principal: &str, resource: &str, body: &Value) -> Response {
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

pub(super) fn decrypt(kms: &mut Kms, principal: &str, resource: &str, body: &Value) -> Response {
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
