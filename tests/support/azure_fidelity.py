"""Drives the fake Azure Key Vault and Entra with Microsoft's own Python SDK
(azure-keyvault-keys, azure-identity), through the same CONNECT tunnel and
test CA as keybroker (HTTPS_PROXY, REQUESTS_CA_BUNDLE). Every behaviour the
Rust provider relies on is checked here against what Microsoft's client
expects; the last line printed is a JSON report for tests/it/azure.rs.
"""

import base64
import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.core.rest import HttpRequest
from azure.identity import ClientSecretCredential
from azure.keyvault.keys import JsonWebKey, KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

SCOPE = "https://vault.azure.net/.default"
ALG = KeyWrapAlgorithm.rsa_oaep_256

checks = []


def check(name, ok, detail=""):
    if not ok:
        print(f"FAILED {name}: {detail}", file=sys.stderr)
        sys.exit(1)
    checks.append(name)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def credential(tenant, client_id, secret):
    # Instance discovery is Microsoft's cloud metadata, not the tenant's.
    return ClientSecretCredential(tenant, client_id, secret, disable_instance_discovery=True)


def main():
    given = json.loads(sys.argv[1])
    tenant = given["tenant"]
    vault_url = given["vault_url"]
    admin = credential(tenant, "admin", "admin-password")
    app = credential(tenant, given["client_id"], given["client_secret"])
    keys = KeyClient(vault_url, admin)

    # The first call meets the challenge, then gets a token for the
    # resource the challenge names.
    key = keys.get_key("pykey")
    check("challenge_then_token", key.id.startswith(vault_url + "/keys/pykey/"), key.id)
    # The ownership tag keybroker reads: set on the key, read back by get.
    tagged = keys.update_key_properties("pykey", tags={"keybroker-tenant": "kb-0123abcd"})
    check(
        "tags_round_trip",
        tagged.properties.tags == {"keybroker-tenant": "kb-0123abcd"}
        and keys.get_key("pykey").properties.tags == {"keybroker-tenant": "kb-0123abcd"},
        tagged.properties.tags,
    )
    check(
        "get_key_public_jwk",
        key.key_type == "RSA"
        and len(key.key.n) == 256
        and key.key.e == b"\x01\x00\x01"
        and len(key.properties.version) == 32
        and "wrapKey" in key.key_operations
        and key.properties.recovery_level == "Recoverable+Purgeable",
        repr(key.properties.recovery_level),
    )

    dek = os.urandom(32)
    version = key.properties.version
    # A wrap by the service (the path keybroker uses), through the SDK's
    # pipeline; the kid names the version used.
    response = keys.send_request(
        HttpRequest(
            "POST",
            f"/keys/pykey/{version}/wrapkey?api-version=7.6",
            json={"alg": "RSA-OAEP-256", "value": b64url(dek)},
        )
    )
    response.raise_for_status()
    wrapped_by_fake = response.json()
    check("wrap_names_version", wrapped_by_fake["kid"].endswith("/" + version), wrapped_by_fake["kid"])

    # The fake's RSA-OAEP-256 is real: the key's owner opens it locally.
    jwk = given["jwk"]
    fields = {k: unb64url(jwk[k]) for k in ("n", "e", "d", "p", "q", "dp", "dq", "qi")}
    local = CryptographyClient.from_jwk(JsonWebKey(kid=jwk["kid"], kty="RSA", key_ops=jwk["key_ops"], **fields))
    opened = local.unwrap_key(ALG, unb64url(wrapped_by_fake["value"]))
    check("fake_wrap_opens_locally_with_jwk", opened.key == dek)

    # The application (the crypto role only): the SDK wraps locally with
    # the public key and unwraps through the service.
    crypto = CryptographyClient(key.id, app)
    local_wrap = crypto.wrap_key(ALG, dek)
    unwrapped = crypto.unwrap_key(ALG, local_wrap.encrypted_key)
    check("local_wrap_opens_in_fake", unwrapped.key == dek)
    check("unwrap_round_trip", unwrapped.key_id == key.id, unwrapped.key_id)
    python_wrapped = {"kid": key.id, "value": b64url(local_wrap.encrypted_key), "plaintext_hex": dek.hex()}

    try:
        crypto.unwrap_key(ALG, b"\x00" * 256)
        check("bad_ciphertext_bad_parameter", False, "no error")
    except HttpResponseError as e:
        check("bad_ciphertext_bad_parameter", e.status_code == 400 and e.error.code == "BadParameter", str(e))

    keys.update_key_properties("pykey", enabled=False)
    try:
        crypto.unwrap_key(ALG, local_wrap.encrypted_key)
        check("disabled_key_forbidden", False, "no error")
    except HttpResponseError as e:
        check("disabled_key_forbidden", e.status_code == 403 and "disabled" in e.message, str(e))
    keys.update_key_properties("pykey", enabled=True)

    keys.update_key_properties("pykey", expires_on=datetime.now(timezone.utc) - timedelta(hours=1))
    try:
        crypto.unwrap_key(ALG, local_wrap.encrypted_key)
        check("expired_key_forbidden", False, "no error")
    except HttpResponseError as e:
        check("expired_key_forbidden", e.status_code == 403 and "expired" in e.message, str(e))
    keys.update_key_properties("pykey", expires_on=datetime.now(timezone.utc) + timedelta(days=365))

    rotated = keys.rotate_key("pykey")
    old = CryptographyClient(key.id, app).unwrap_key(ALG, local_wrap.encrypted_key)
    check(
        "rotate_keeps_old_versions",
        rotated.properties.version != version and old.key == dek and keys.get_key("pykey").id == rotated.id,
    )

    keys.begin_delete_key("pykey").wait()
    try:
        keys.get_key("pykey")
        check("soft_delete_not_found_with_recovery_hint", False, "still found")
    except ResourceNotFoundError as e:
        check(
            "soft_delete_not_found_with_recovery_hint",
            e.error.code == "KeyNotFound" and "recover" in e.message,
            str(e),
        )
    keys.begin_recover_deleted_key("pykey").wait()
    check("recover_restores", keys.get_key("pykey").id == rotated.id)

    # Throttled once with Retry-After: 1; the SDK waits and succeeds.
    keys.send_request(HttpRequest("POST", "/_fake/throttle?n=1&secs=1&api-version=7.6")).raise_for_status()
    started = time.monotonic()
    keys.get_key("pykey")
    check("throttled_retry_after_honoured", time.monotonic() - started >= 1.0, time.monotonic() - started)

    no_role = KeyClient(vault_url, credential(tenant, given["norole_client_id"], given["norole_secret"]))
    try:
        no_role.get_key("pykey")
        check("no_role_forbidden", False, "no error")
    except HttpResponseError as e:
        check("no_role_forbidden", e.status_code == 403 and e.error.code == "Forbidden", str(e))

    def token_error(cred):
        try:
            cred.get_token(SCOPE)
            return "no error"
        except ClientAuthenticationError as e:
            return str(e)

    said = token_error(credential(given["unconsented_tenant"], given["client_id"], given["client_secret"]))
    check("unconsented_app_aadsts700016", "AADSTS700016" in said, said)
    said = token_error(credential(given["unknown_tenant"], given["client_id"], given["client_secret"]))
    # MSAL reads the tenant's OpenID configuration first; Entra answers an
    # unknown tenant with AADSTS90002 there, which MSAL reports this way.
    check("unknown_tenant_aadsts90002", "90002" in said or "Unable to get authority configuration" in said, said)
    said = token_error(credential(tenant, given["client_id"], "wrong-secret"))
    check("wrong_secret_aadsts7000215", "AADSTS7000215" in said, said)

    print(json.dumps({"checks": checks, "python_wrapped": python_wrapped}))


if __name__ == "__main__":
    main()
