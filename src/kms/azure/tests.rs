//! Tests of `kms/azure/mod.rs`.

use super::*;

/// Credentials are per customer tenant, bounded: a platform with many
/// tenants keeps at most `azure_identity_cache_capacity` of them.
#[test]
fn credentials_are_bounded_per_customer_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let settings = AzureSettings {
        client_id: Some("11111111-2222-3333-4444-555555555555".into()),
        client_secret_file: Some(secret),
        identity: AzureIdentityCache {
            capacity: 3,
            ..AzureSettings::default().identity
        },
        ..AzureSettings::default()
    };
    settings.validate().unwrap();
    let kv = AzureKeyVault::new(settings).unwrap();
    let tenant = |i: u32| format!("{i:08x}-0000-0000-0000-000000000000");
    let first = kv.credential(&tenant(1)).unwrap();
    let again = kv.credential(&tenant(1)).unwrap();
    assert!(Arc::ptr_eq(&first, &again), "one credential per tenant");
    for i in 0..20 {
        kv.credential(&tenant(i)).unwrap();
    }
    assert!(kv.live_credentials() <= 3, "{}", kv.live_credentials());
    // The secret never shows in Debug.
    assert!(!format!("{kv:?}").contains("s3cret"));
}

#[test]
fn settings_need_exactly_one_proof() {
    let mut settings = AzureSettings {
        client_id: Some("11111111-2222-3333-4444-555555555555".into()),
        ..AzureSettings::default()
    };
    assert!(settings.validate().is_err());
    settings.client_secret_file = Some("/a".into());
    settings.federated_token_file = Some("/b".into());
    assert!(settings.validate().is_err());
    settings.federated_token_file = None;
    assert!(settings.validate().is_ok());
}

#[test]
fn versions_are_key_vault_versions() {
    assert_eq!(version_of("https://v.vault.azure.net/keys/k/0123"), "0123");
}
