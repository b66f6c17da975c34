//! What a customer does in their project, through Google's own Rust client:
//! create, rotate, disable, destroy, grant.

/// Key administration in the fake through Google's own Rust client: what a
/// customer does in their project (create, rotate, disable, destroy, grant).
#[derive(Debug, Clone)]
pub(crate) struct CloudKmsAdmin {
    client: google_cloud_kms_v1::client::KeyManagementService,
    /// The external id of the keybroker tenant the customer makes keys for:
    /// their keys carry it as the `keybroker-tenant` label (onboarding's
    /// `key_owner_tag`). None: keys without it.
    owner: Option<String>,
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
        Self {
            client,
            owner: None,
        }
    }

    /// This customer's keys from now on carry the tenant's
    /// `keybroker-tenant` label.
    pub(crate) fn owned_by(mut self, external_id: &str) -> Self {
        self.owner = Some(external_id.to_owned());
        self
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
                    .set_labels(
                        self.owner
                            .iter()
                            .map(|owner| ("keybroker-tenant", owner.as_str())),
                    )
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

    /// What proves the key is the tenant's: the customer labels it
    /// `keybroker-tenant=<the tenant's external id>` (UpdateCryptoKey).
    pub(crate) async fn label_owner(&self, key: &str, external_id: &str) {
        use google_cloud_kms_v1::model::CryptoKey;
        let updated = self
            .client
            .update_crypto_key()
            .set_crypto_key(
                CryptoKey::new()
                    .set_name(key)
                    .set_labels([("keybroker-tenant", external_id)]),
            )
            .set_update_mask(google_cloud_wkt::FieldMask::default().set_paths(["labels"]))
            .send()
            .await
            .unwrap();
        assert_eq!(
            updated.labels.get("keybroker-tenant").map(String::as_str),
            Some(external_id)
        );
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
