//! Local keys: an AES-256-GCM keyring of numbered versions. The newest version
//! encrypts, every version decrypts. It is the platform key of the embedded
//! default (a 0600 JSON file in the data dir) and, later, the home of raw key
//! material that customers import.
//!
//! New wraps use the construction in `seal` (AES-256-GCM under a per-wrap
//! HKDF-derived key, safe at any volume). Wrapped keys of the legacy layout
//! (12-byte random nonce, then AES-GCM ciphertext and tag under the version
//! key itself) stay readable.
//!
//! The file itself (its format, rotation, and sealing under an HSM key)
//! is `file.rs`.

mod file;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use parking_lot::RwLock;
use zeroize::Zeroizing;

pub use self::file::{KeyringSeal, reseal_keyring_file, rotate_keyring_file};

use super::{
    Ciphertext, KeyDescription, KeyProvider, ProviderError, ProviderKeyState, ProviderKind,
    WrapContext,
};
use crate::seal::SealingKey;
use crate::secret::SecretBytes;

const KEY_LEN: usize = 32;

/// Legacy-layout unwraps served since start, every local keyring together
/// (`keybroker_legacy_local_unwraps_total`): when it stays at zero, the
/// operator can refuse them (`legacy_local_wraps = refuse`).
pub static LEGACY_UNWRAPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether wrapped keys of the legacy layout (random nonce under the
/// version key, written before the `seal` construction) are still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, strum::FromRepr)]
#[repr(u8)]
pub enum LegacyWraps {
    /// Read (and counted) under key versions made before the upgrade to
    /// `seal`-only wraps; refused under versions made since, under which no
    /// genuine one can exist.
    #[default]
    Predating,
    /// Read (and counted) under every version, as every release before did.
    Accept,
    /// Refused (FAILED_PRECONDITION naming this setting): the metric says
    /// none was read for as long as the operator wanted to be sure.
    Refuse,
}

const TAG_LEN: usize = 16;

/// Errors loading, creating or rotating a keyring file. These stop the server
/// at start (or are logged on reload), so they name the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyring file {path}: {cause}")]
    Io {
        path: PathBuf,
        /// Named `cause`, not `source`: the message already includes it, so
        /// error chains do not print it twice.
        cause: std::io::Error,
    },
    #[error(
        "keyring file {path} is readable or writable by group or others (mode {mode:o}); run: chmod 600 {path} (a read-only 0440 Secret mount is also accepted)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("keyring file {path} is not a valid keyring: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("keyring file {path}: {reason}")]
    Seal { path: PathBuf, reason: String },
    #[error("could not generate key material: the system random generator failed")]
    Random,
}

/// Loaded key versions. Immutable: a reload or rotation builds a new one.
struct Versions {
    keys: BTreeMap<u32, VersionKey>,
    created: BTreeMap<u32, u64>,
    newest: u32,
    /// Versions made since wraps are `seal` only: no legacy wrap under them.
    seal_only: std::collections::BTreeSet<u32>,
}

impl Versions {
    fn from_material(path: &Path, material: Vec<file::Material>) -> Result<Self, KeyringError> {
        let mut keys = BTreeMap::new();
        let mut created = BTreeMap::new();
        let mut seal_only = std::collections::BTreeSet::new();
        for m in material {
            let key = aes_key(m.key.expose()).ok_or_else(|| KeyringError::Invalid {
                path: path.to_owned(),
                reason: format!("version {} is not a {KEY_LEN}-byte key", m.version),
            })?;
            keys.insert(m.version, key);
            created.insert(m.version, m.created_unix);
            if m.seal_only {
                seal_only.insert(m.version);
            }
        }
        let newest = *keys
            .keys()
            .next_back()
            .ok_or_else(|| KeyringError::Invalid {
                path: path.to_owned(),
                reason: "no key versions".into(),
            })?;
        Ok(Self {
            keys,
            created,
            newest,
            seal_only,
        })
    }
}

/// One key version: the long-term key of the `seal` construction (new
/// wraps), and the same bytes as a plain AES-GCM key (legacy wraps).
struct VersionKey {
    sealing: SealingKey,
    legacy: LessSafeKey,
}

fn aes_key(material: &[u8]) -> Option<VersionKey> {
    if material.len() != KEY_LEN {
        return None;
    }
    let legacy = UnboundKey::new(&AES_256_GCM, material)
        .ok()
        .map(LessSafeKey::new)?;
    Some(VersionKey {
        sealing: SealingKey::new(material)?,
        legacy,
    })
}

use crate::reload::Stamp as FileStamp;

/// Loads the file's versions, unsealing them with `seal` when sealed.
fn load(
    path: &Path,
    seal: Option<&dyn KeyringSeal>,
) -> Result<(Versions, FileStamp), KeyringError> {
    let (material, stamp) = file::load(path, seal)?;
    Ok((Versions::from_material(path, material)?, stamp))
}

/// A local keyring, usable as a [`KeyProvider`].
pub struct LocalKeyring {
    /// Name shown in errors and descriptions (`platform`, a binding name).
    id: String,
    /// Backing file, when the keyring lives in one.
    path: Option<PathBuf>,
    /// Current versions. Readers clone the `Arc` and release the lock at once;
    /// a reload swaps in a whole new set, so a wrap never sees a half-loaded
    /// keyring. Held for a pointer copy, never across an await.
    versions: RwLock<Arc<Versions>>,
    /// File identity at the last load; written only by `reload_if_changed`.
    stamp: RwLock<Option<FileStamp>>,
    /// The HSM key the file's versions are sealed under, if any.
    seal: Option<Arc<dyn KeyringSeal>>,
    /// Whether the sealing key passed its last check (true unsealed).
    seal_usable: std::sync::atomic::AtomicBool,
    /// Which legacy-layout wraps are read ([`LegacyWraps`] as its `u8`).
    legacy: std::sync::atomic::AtomicU8,
}

impl fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKeyring")
            .field("id", &self.id)
            .field("path", &self.path)
            .field("newest_version", &self.current().newest)
            .field("sealed_by", &self.seal.as_ref().map(|s| s.name()))
            .finish_non_exhaustive()
    }
}

impl LocalKeyring {
    /// Opens the keyring file at `path`, creating it (mode 0600, one fresh
    /// version) when absent. Refuses a file group or others can read.
    pub fn open_or_create(id: &str, path: &Path) -> Result<Self, KeyringError> {
        Self::open_or_create_sealed(id, path, None)
    }

    /// [`open_or_create`](Self::open_or_create) for a file whose versions
    /// are sealed under `seal` (an HSM key): created sealed when absent, and
    /// refused unless sealed by that key.
    pub fn open_or_create_sealed(
        id: &str,
        path: &Path,
        seal: Option<Arc<dyn KeyringSeal>>,
    ) -> Result<Self, KeyringError> {
        if !path.exists() {
            file::create(path, seal.as_deref())?;
        }
        let (versions, stamp) = load(path, seal.as_deref())?;
        Ok(Self {
            id: id.to_owned(),
            path: Some(path.to_owned()),
            versions: RwLock::new(Arc::new(versions)),
            stamp: RwLock::new(Some(stamp)),
            seal,
            seal_usable: std::sync::atomic::AtomicBool::new(true),
            legacy: std::sync::atomic::AtomicU8::new(LegacyWraps::Predating as u8),
        })
    }

    /// Which legacy-layout wraps are read from now on.
    pub fn set_legacy_wraps(&self, legacy: LegacyWraps) {
        self.legacy
            .store(legacy as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// Adds a new version to the backing file and loads it; its number.
    pub fn rotate(&self) -> Result<u32, KeyringError> {
        let Some(path) = &self.path else {
            return Err(KeyringError::Invalid {
                path: PathBuf::from(&self.id),
                reason: "an in-memory keyring has no file to rotate".into(),
            });
        };
        let version = rotate_keyring_file(path, self.seal.as_deref())?;
        self.reload_if_changed()?;
        Ok(version)
    }

    /// A keyring held only in memory, from raw 32-byte key versions (oldest
    /// first). Used for imported customer key material.
    pub fn from_material(id: &str, material: &[SecretBytes]) -> Result<Self, KeyringError> {
        Self::from_imported(id, material, Some(1))
    }

    /// [`from_material`](Self::from_material) for stored imported material
    /// whose versions from `seal_only_from` on were made since wraps are
    /// `seal` only (`None`: every version predates that, and may have
    /// legacy-layout wraps).
    pub fn from_imported(
        id: &str,
        material: &[SecretBytes],
        seal_only_from: Option<u32>,
    ) -> Result<Self, KeyringError> {
        let mut keys = BTreeMap::new();
        let mut created = BTreeMap::new();
        for (i, m) in material.iter().enumerate() {
            let key = aes_key(m.expose()).ok_or_else(|| KeyringError::Invalid {
                path: PathBuf::from(id),
                reason: format!("key material must be {KEY_LEN} bytes, got {}", m.len()),
            })?;
            let version = u32::try_from(i + 1).unwrap_or(u32::MAX);
            keys.insert(version, key);
            created.insert(version, 0);
        }
        let newest = *keys
            .keys()
            .next_back()
            .ok_or_else(|| KeyringError::Invalid {
                path: PathBuf::from(id),
                reason: "no key versions".into(),
            })?;
        let seal_only = keys
            .keys()
            .copied()
            .filter(|v| seal_only_from.is_some_and(|first| *v >= first))
            .collect();
        Ok(Self {
            id: id.to_owned(),
            path: None,
            versions: RwLock::new(Arc::new(Versions {
                keys,
                created,
                newest,
                seal_only,
            })),
            stamp: RwLock::new(None),
            seal: None,
            seal_usable: std::sync::atomic::AtomicBool::new(true),
            legacy: std::sync::atomic::AtomicU8::new(LegacyWraps::Predating as u8),
        })
    }

    fn current(&self) -> Arc<Versions> {
        Arc::clone(&self.versions.read())
    }

    /// The key of the version a wrapped key names. A version that is not a
    /// number or not in the keyring can only come from the caller's bytes
    /// (or a version removed from the file): the caller's problem alone,
    /// never a reason to doubt the keyring.
    fn version_key<'v>(
        &self,
        versions: &'v Versions,
        version: &str,
    ) -> Result<&'v VersionKey, ProviderError> {
        let number: u32 = version.parse().map_err(|_| {
            ProviderError::InvalidCiphertext(format!(
                "the wrapped key names local key version {}, which is not a version number",
                crate::text::Quoted(version)
            ))
        })?;
        versions.keys.get(&number).ok_or_else(|| {
            ProviderError::InvalidCiphertext(format!(
                "the wrapped key names version {number} of local key '{}', which it does not have (newest: {})",
                self.id, versions.newest
            ))
        })
    }

    /// A version number past the newest this process loaded, of a keyring
    /// that lives in a file (which may hold it by now).
    fn is_newer(&self, versions: &Versions, version: &str) -> bool {
        self.path.is_some() && version.parse::<u32>().is_ok_and(|n| n > versions.newest)
    }

    /// When the newest version was created (Unix seconds; 0 if unknown).
    pub fn newest_created_unix(&self) -> u64 {
        let versions = self.current();
        versions.created.get(&versions.newest).copied().unwrap_or(0)
    }

    /// Per version, oldest first: a key derived from it under `label`
    /// (replicas sharing the keyring derive the same keys; a rotation adds
    /// one, and the older ones live as long as their versions).
    pub fn derived_keys(&self, label: &[u8]) -> Vec<(u32, Zeroizing<[u8; 32]>)> {
        self.current()
            .keys
            .iter()
            .map(|(v, key)| (*v, key.sealing.derive_subkey(label)))
            .collect()
    }

    pub fn newest_version(&self) -> u32 {
        self.current().newest
    }

    /// `(version, created_unix)` of every version, oldest first. No key bytes.
    pub fn version_list(&self) -> Vec<(u32, u64)> {
        self.current()
            .created
            .iter()
            .map(|(v, c)| (*v, *c))
            .collect()
    }

    /// Reloads the file if it changed since the last load. Returns whether it
    /// did. A broken new file is reported and the old keyring kept.
    pub fn reload_if_changed(&self) -> Result<bool, KeyringError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let now = FileStamp::of(path).map_err(|cause| KeyringError::Io {
            path: path.clone(),
            cause,
        })?;
        let last = *self.stamp.read();
        if last == Some(now) {
            return Ok(false);
        }
        let (versions, stamp) = load(path, self.seal.as_deref())?;
        *self.versions.write() = Arc::new(versions);
        *self.stamp.write() = Some(stamp);
        Ok(true)
    }

    /// Whether the HSM key sealing this keyring is usable, as of the last
    /// check; `None` for a keyring that is not sealed.
    pub fn seal_usable(&self) -> Option<bool> {
        self.seal
            .as_ref()
            .map(|_| self.seal_usable.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Checks the sealing key (one token call) and logs when that changes:
    /// the running process serves from memory, but the next start (or
    /// reload) needs the key.
    pub fn check_seal(&self) {
        let Some(seal) = &self.seal else {
            return;
        };
        let result = seal.check();
        let usable = result.is_ok();
        let was = self
            .seal_usable
            .swap(usable, std::sync::atomic::Ordering::Relaxed);
        match result {
            Err(err) if was => tracing::error!(
                keyring = %self.id,
                sealed_by = %seal.name(),
                error = %err,
                "the HSM key sealing the platform keyring is not usable: this process keeps serving from memory, but no replica can start or load a rotated keyring until it is back"
            ),
            Ok(()) if !was => tracing::info!(
                keyring = %self.id,
                sealed_by = %seal.name(),
                "the HSM key sealing the platform keyring is usable again"
            ),
            _ => {}
        }
    }

    /// Polls the backing file every `interval` and reloads it when it
    /// changed, so `keybroker keyring rotate` (or a rotated Kubernetes Secret)
    /// takes effect without a restart.
    pub fn reloader(
        self: &Arc<Self>,
        interval: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        crate::reload::every(interval, self, |keyring| {
            keyring.check_seal();
            match keyring.reload_if_changed() {
                Ok(true) => tracing::info!(
                    keyring = %keyring.id,
                    newest_version = keyring.newest_version(),
                    "keyring reloaded"
                ),
                Ok(false) => {}
                Err(err) => tracing::warn!(
                    keyring = %keyring.id,
                    error = %err,
                    "keyring file changed but could not be loaded; keeping the previous versions"
                ),
            }
        })
    }
}

/// Errors of a local keyring and whether a caller's bytes can cause them
/// (DESIGN.md section 5): none of them may revoke anything, since a local
/// key has no state a customer can change.
///
/// | error | cause | caller bytes can cause it | may revoke |
/// | --- | --- | --- | --- |
/// | `InvalidCiphertext` | version not a number or not in the keyring, ciphertext too short, AES-GCM authentication failed (wrong tenant or context, altered bytes) | yes | no |
/// | `Internal` | system RNG or AES-GCM seal failure | no | no |
#[async_trait]
impl KeyProvider for LocalKeyring {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        let versions = self.current();
        let key = versions
            .keys
            .get(&versions.newest)
            .ok_or_else(|| ProviderError::Internal("keyring has no newest version".into()))?;
        let out = key
            .sealing
            .seal(plaintext.expose(), &wrap.aad())
            .map_err(|e| ProviderError::Internal(e.to_string()))?;
        Ok(Ciphertext {
            bytes: out,
            key_version: versions.newest.to_string(),
        })
    }

    async fn decrypt(
        &self,
        key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError> {
        let mut versions = self.current();
        if self.is_newer(&versions, key_version) {
            // Another replica sharing the file may have rotated it since our
            // last reload tick: look once (a stat; a reload only if changed).
            let _ = self.reload_if_changed();
            versions = self.current();
        }
        let key = self.version_key(&versions, key_version)?;
        let aad = wrap.aad();
        if crate::seal::is_sealed(ciphertext)
            && let Ok(plaintext) = key.sealing.open(ciphertext, &aad)
        {
            return Ok(plaintext);
        }
        // The legacy layout (or a legacy nonce that happens to start with
        // the magic: tried both ways, authentication decides).
        let mode = LegacyWraps::from_repr(self.legacy.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or_default();
        if mode == LegacyWraps::Refuse {
            return Err(ProviderError::VersionDisabled(format!(
                "a wrapped key of the legacy layout under {} version {key_version}, which the operator refuses (legacy_local_wraps = refuse); set it to accept to read it, then rewrap it",
                self.id
            )));
        }
        if mode == LegacyWraps::Predating
            && let Ok(number) = key_version.parse::<u32>()
            && versions.seal_only.contains(&number)
        {
            // No genuine one exists: this build never writes the layout.
            return Err(ProviderError::InvalidCiphertext(format!(
                "a wrapped key of the legacy layout under {} version {key_version}, which was made after keybroker stopped writing that layout: it is not a wrapped key keybroker made",
                self.id
            )));
        }
        let key = &key.legacy;
        if ciphertext.len() < NONCE_LEN + TAG_LEN {
            return Err(ProviderError::InvalidCiphertext(
                "ciphertext is shorter than nonce and tag".into(),
            ));
        }
        let (nonce, body) = ciphertext.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| ProviderError::Internal("nonce length".into()))?;
        let mut buf = Zeroizing::new(body.to_vec());
        let plain_len = key
            .open_in_place(nonce, Aad::from(aad.as_slice()), &mut buf)
            .map_err(|_| {
                ProviderError::InvalidCiphertext(
                    "authentication failed: the context or tenant differs from the wrap, or the wrapped key was altered".into(),
                )
            })?
            .len();
        LEGACY_UNWRAPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        buf.truncate(plain_len);
        Ok(SecretBytes::new(std::mem::take(&mut *buf)))
    }

    fn current_version(&self) -> Option<String> {
        Some(self.newest_version().to_string())
    }

    fn is_current_version(&self, version: &str) -> Option<bool> {
        let newest = self.versions.read().newest;
        Some(version.parse::<u32>().is_ok_and(|v| v == newest))
    }

    fn check_version(&self, version: &str) -> Result<(), ProviderError> {
        self.version_key(&self.current(), version).map(|_| ())
    }

    async fn describe(&self) -> Result<KeyDescription, ProviderError> {
        Ok(KeyDescription {
            state: ProviderKeyState::Enabled,
            current_version: self.newest_version().to_string(),
            ..KeyDescription::default()
        })
    }
}

impl crate::metrics::KeyringSource for LocalKeyring {
    fn seal_usable(&self) -> Option<bool> {
        LocalKeyring::seal_usable(self)
    }

    fn legacy_unwraps(&self) -> u64 {
        LEGACY_UNWRAPS.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
