//! Tests of `kms/pkcs11.rs`.

use super::*;

#[test]
fn references_parse() {
    let r = Pkcs11KeyRef::parse("pkcs11:token=kb-hsm;object=acme kek").unwrap();
    assert_eq!(
        (r.token.as_str(), r.object.as_str()),
        ("kb-hsm", "acme kek")
    );
    assert_eq!(r.to_string(), "pkcs11:token=kb-hsm;object=acme kek");
    for bad in [
        "pkcs11:token=a",
        "pkcs11:object=a",
        "token=a;object=b",
        "pkcs11:token=a;object=b;module-path=/tmp/x.so",
        "pkcs11:token=a;object=b\n",
        "pkcs11:token=;object=b",
    ] {
        assert!(Pkcs11KeyRef::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn ckr_errors_classify() {
    let cases = [
        (RvError::KeyHandleInvalid, "not_found"),
        (RvError::ObjectHandleInvalid, "not_found"),
        (RvError::EncryptedDataInvalid, "invalid_ciphertext"),
        (RvError::EncryptedDataLenRange, "invalid_ciphertext"),
        (RvError::PinIncorrect, "access_denied"),
        (RvError::PinLocked, "access_denied"),
        (RvError::UserNotLoggedIn, "access_denied"),
        (RvError::KeyFunctionNotPermitted, "key_disabled"),
        (RvError::DeviceError, "unavailable"),
        (RvError::DeviceRemoved, "unavailable"),
        (RvError::TokenNotPresent, "unavailable"),
        (RvError::SessionHandleInvalid, "unavailable"),
        (RvError::ArgumentsBad, "internal"),
    ];
    // SoftHSM's failed GCM tag: the caller's bytes on decrypt only.
    let tag = classify(
        &CkError::Pkcs11(RvError::GeneralError, Function::Decrypt),
        "k",
    );
    assert_eq!(tag.kind_name(), "invalid_ciphertext");
    let other = classify(
        &CkError::Pkcs11(RvError::GeneralError, Function::Encrypt),
        "k",
    );
    assert_eq!(other.kind_name(), "internal");
    for (rv, want) in cases {
        let got = classify(
            &CkError::Pkcs11(rv, Function::Decrypt),
            "pkcs11:token=t;object=k",
        );
        assert_eq!(got.kind_name(), want, "{rv:?} -> {got}");
        assert!(got.to_string().contains("object=k"), "{got}");
    }
}
