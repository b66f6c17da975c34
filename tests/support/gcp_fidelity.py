"""Drives the fake Cloud KMS with Google's own Python client (google-cloud-kms,
REST transport, anonymous credentials) and checks the behaviours keybroker's
Rust provider relies on. Exits non-zero on the first mismatch; on success
prints one JSON line: the checks passed, plus a key and a ciphertext that the
Rust test decrypts with Google's Rust client.

Usage: gcp_fidelity.py http://127.0.0.1:PORT
"""

import base64
import json
import sys
import warnings

warnings.simplefilter("ignore", FutureWarning)

import google_crc32c  # noqa: E402
from google.api_core import exceptions  # noqa: E402
from google.api_core.client_options import ClientOptions  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud import kms  # noqa: E402
from google.iam.v1 import iam_policy_pb2, policy_pb2  # noqa: E402

ROLE = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
checks = []


def crc(data: bytes) -> int:
    return int(google_crc32c.value(data))


def check(name: str, ok: bool, detail: object = "") -> None:
    if not ok:
        sys.exit(f"fidelity check {name} failed: {detail}")
    checks.append(name)


def expect(name: str, error: type, call, contains: str = "", status: str = "") -> None:
    """The call fails with `error` (api_core picks the class from the HTTP
    status, so 400s are all BadRequest) and Google's `status` name."""
    try:
        call()
    except error as e:
        check(name, contains in str(e), f"{e!r} does not mention {contains!r}")
        if status:
            got = e.response.json()["error"]["status"]
            check(name + "_status", got == status, f"{got} != {status}")
        return
    except Exception as e:  # noqa: BLE001
        sys.exit(f"fidelity check {name}: expected {error.__name__}, got {e!r}")
    sys.exit(f"fidelity check {name}: expected {error.__name__}, the call succeeded")


def main() -> None:
    client = kms.KeyManagementServiceClient(
        credentials=AnonymousCredentials(),
        transport="rest",
        client_options=ClientOptions(api_endpoint=sys.argv[1]),
    )
    parent = "projects/py-project/locations/global"
    ring = client.create_key_ring(
        request={"parent": parent, "key_ring_id": "py-ring", "key_ring": {}}
    )
    key = client.create_crypto_key(
        request={
            "parent": ring.name,
            "crypto_key_id": "py-key",
            "crypto_key": {
                "purpose": kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
                "rotation_period": {"seconds": 90 * 86400},
                "labels": {"team": "storage"},
                "next_rotation_time": {"seconds": 4102444800},
                "version_template": {
                    "protection_level": kms.ProtectionLevel.HSM,
                    "algorithm": kms.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
                },
            },
        }
    )
    got = client.get_crypto_key(name=key.name)
    v1 = f"{key.name}/cryptoKeyVersions/1"
    check(
        "crypto_key_fields",
        got.primary.name == v1
        and got.primary.state == kms.CryptoKeyVersion.CryptoKeyVersionState.ENABLED
        and got.primary.protection_level == kms.ProtectionLevel.HSM
        and got.purpose == kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
        and got.rotation_period.total_seconds() == 90 * 86400,
        got,
    )

    # The ownership label keybroker reads: set by UpdateCryptoKey (the
    # labels mask replaces the map), read back by GetCryptoKey; a label
    # Cloud KMS would refuse is refused.
    updated = client.update_crypto_key(
        request={
            "crypto_key": {"name": key.name, "labels": {"keybroker-tenant": "kb-0123abcd"}},
            "update_mask": {"paths": ["labels"]},
        }
    )
    check(
        "labels_round_trip",
        dict(got.labels) == {"team": "storage"}
        and dict(updated.labels) == {"keybroker-tenant": "kb-0123abcd"}
        and dict(client.get_crypto_key(name=key.name).labels) == {"keybroker-tenant": "kb-0123abcd"},
        updated.labels,
    )
    expect(
        "bad_label_invalid_argument",
        exceptions.BadRequest,
        lambda: client.update_crypto_key(
            request={
                "crypto_key": {"name": key.name, "labels": {"Upper": "x"}},
                "update_mask": {"paths": ["labels"]},
            }
        ),
        status="INVALID_ARGUMENT",
    )

    plaintext, aad = b"made by the python client", b"python-aad"

    def encrypt(pt=plaintext, a=aad, **extra):
        request = {
            "name": key.name,
            "plaintext": pt,
            "additional_authenticated_data": a,
            "plaintext_crc32c": crc(pt),
            "additional_authenticated_data_crc32c": crc(a),
        }
        request.update(extra)
        return client.encrypt(request=request)

    def decrypt(ct, a=aad, **extra):
        request = {
            "name": key.name,
            "ciphertext": ct,
            "additional_authenticated_data": a,
            "ciphertext_crc32c": crc(ct),
            "additional_authenticated_data_crc32c": crc(a),
        }
        request.update(extra)
        return client.decrypt(request=request)

    enc = encrypt()
    check("encrypt_names_primary_version", enc.name == v1, enc.name)
    check("response_crc32c_matches", enc.ciphertext_crc32c == crc(enc.ciphertext), enc)
    check(
        "request_crc32c_verified",
        enc.verified_plaintext_crc32c and enc.verified_additional_authenticated_data_crc32c,
        enc,
    )
    dec = decrypt(enc.ciphertext)
    check(
        "decrypt_round_trip",
        dec.plaintext == plaintext and dec.plaintext_crc32c == crc(plaintext) and dec.used_primary,
        dec,
    )
    expect(
        "wrong_aad_invalid_argument",
        exceptions.BadRequest,
        lambda: decrypt(enc.ciphertext, a=b"other"),
        "Decryption failed",
        status="INVALID_ARGUMENT",
    )
    expect(
        "bad_request_crc32c_invalid_argument",
        exceptions.BadRequest,
        lambda: decrypt(enc.ciphertext, ciphertext_crc32c=crc(enc.ciphertext) ^ 1),
        "checksum",
        status="INVALID_ARGUMENT",
    )

    # Rotation: a new version becomes primary; the old one still decrypts.
    v2 = client.create_crypto_key_version(
        request={"parent": key.name, "crypto_key_version": {}}
    ).name
    updated = client.update_crypto_key_primary_version(
        request={"name": key.name, "crypto_key_version_id": v2.rsplit("/", 1)[1]}
    )
    enc2 = encrypt()
    old = decrypt(enc.ciphertext)
    check(
        "rotation_keeps_old_versions",
        updated.primary.name == v2 and enc2.name == v2 and old.plaintext == plaintext and not old.used_primary,
        (updated.primary.name, enc2.name, old.used_primary),
    )

    def set_state(version, state):
        return client.update_crypto_key_version(
            request={
                "crypto_key_version": {"name": version, "state": state},
                "update_mask": {"paths": ["state"]},
            }
        )

    disabled = kms.CryptoKeyVersion.CryptoKeyVersionState.DISABLED
    enabled = kms.CryptoKeyVersion.CryptoKeyVersionState.ENABLED
    check("disable_version", set_state(v1, disabled).state == disabled)
    expect(
        "disabled_version_failed_precondition",
        exceptions.BadRequest,
        lambda: decrypt(enc.ciphertext),
        "DISABLED",
        status="FAILED_PRECONDITION",
    )
    destroyed = client.destroy_crypto_key_version(name=v1)
    check(
        "destroy_schedules",
        destroyed.state == kms.CryptoKeyVersion.CryptoKeyVersionState.DESTROY_SCHEDULED,
        destroyed,
    )
    expect(
        "destroyed_version_failed_precondition",
        exceptions.BadRequest,
        lambda: decrypt(enc.ciphertext),
        "DESTROY_SCHEDULED",
        status="FAILED_PRECONDITION",
    )
    set_state(v2, disabled)
    expect(
        "disabled_primary_encrypt_failed_precondition",
        exceptions.BadRequest,
        lambda: encrypt(),
        "DISABLED",
        status="FAILED_PRECONDITION",
    )
    set_state(v2, enabled)

    def set_members(members):
        policy = policy_pb2.Policy(bindings=[policy_pb2.Binding(role=ROLE, members=members)])
        return client.set_iam_policy(
            request=iam_policy_pb2.SetIamPolicyRequest(resource=key.name, policy=policy)
        )

    set_members(["serviceAccount:someone-else@other.iam.gserviceaccount.com"])
    expect(
        "permission_denied",
        exceptions.Forbidden,
        lambda: encrypt(),
        "cloudkms.cryptoKeyVersions.useToEncrypt",
        status="PERMISSION_DENIED",
    )
    set_members(["allUsers"])
    expect(
        "not_found",
        exceptions.NotFound,
        lambda: client.get_crypto_key(name=f"{ring.name}/cryptoKeys/missing"),
        "not found",
        status="NOT_FOUND",
    )

    final = encrypt()
    print(
        json.dumps(
            {
                "checks": checks,
                "key": key.name,
                "ciphertext": base64.b64encode(final.ciphertext).decode(),
            }
        )
    )


if __name__ == "__main__":
    main()
