//! The keyring file: numbered AES-256 versions in a 0600 JSON file, each
//! either plain (base64) or sealed by a key that never leaves an HSM
//! (`serve --platform-key pkcs11:...`, as Vault's PKCS#11 seal keeps its
//! root key). A sealed file says which key sealed it; each version is sealed
//! with its number and creation time as AAD, so versions cannot be swapped
//! or re-dated without the HSM.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{KEY_LEN, KeyringError};
use crate::kms::ProviderError;
use crate::reload::Stamp;
use crate::secret::SecretBytes;

const FILE_FORMAT: &str = "keybroker-keyring-v1";
/// A different format name on purpose: a keybroker without sealing support
/// refuses the file by name instead of misreading sealed bytes as keys.
const SEALED_FORMAT: &str = "keybroker-keyring-sealed-v1";

/// A key that seals keyring versions at rest. Calls block: a keyring is
/// read at start, on reload and on rotation, never per request.
pub trait KeyringSeal: Send + Sync {
    /// How a sealed file names this key (`pkcs11:token=..;object=..`).
    fn name(&self) -> String;
    fn seal(&self, material: &[u8], aad: &[u8]) -> Result<Vec<u8>, ProviderError>;
    fn unseal(&self, sealed: &[u8], aad: &[u8]) -> Result<SecretBytes, ProviderError>;
    /// Whether the sealing key is still there and usable (checked on
    /// every keyring reload tick: the next start needs it).
    fn check(&self) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// Serialized form. Key material (or its sealed form) is base64 in
/// zeroizing strings.
#[derive(Serialize, Deserialize)]
struct KeyringFile {
    format: String,
    /// The key that sealed every version (sealed files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed_by: Option<String>,
    versions: Vec<VersionEntry>,
}

#[derive(Serialize, Deserialize)]
struct VersionEntry {
    version: u32,
    created_unix: u64,
    key: Zeroizing<String>,
    /// Made by a build that wraps with the `seal` construction only: no
    /// wrapped key of the legacy layout exists under it. Absent in versions
    /// made before (which may have legacy wraps); an older build rewriting
    /// the file drops it, which only makes the version accept them again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    seal_only: bool,
}

/// One version as loaded: its number, creation time and key material.
pub(super) struct Material {
    pub version: u32,
    pub created_unix: u64,
    pub key: SecretBytes,
    pub seal_only: bool,
}

/// What a sealed version is bound to.
fn version_aad(version: u32, created_unix: u64) -> Vec<u8> {
    format!("{SEALED_FORMAT}\0version={version}\0created={created_unix}").into_bytes()
}

fn invalid(path: &Path, reason: impl Into<String>) -> KeyringError {
    KeyringError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn sealing(path: &Path, reason: impl Into<String>) -> KeyringError {
    KeyringError::Seal {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// No access for others, and no group access except reading a file nobody
/// can write: 0440 is how Kubernetes mounts a Secret for a pod's fsGroup.
pub(super) fn private_mode(mode: u32) -> bool {
    mode & 0o007 == 0 && (mode & 0o070 == 0 || (mode & 0o070 == 0o040 && mode & 0o222 == 0))
}

/// Reads and parses the file, refusing one that others may read.
fn read(path: &Path) -> Result<(KeyringFile, Stamp), KeyringError> {
    let io = |cause| KeyringError::Io {
        path: path.to_owned(),
        cause,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if !private_mode(mode) {
        return Err(KeyringError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let stamp = Stamp::of(path).map_err(io)?;
    let bytes = Zeroizing::new(std::fs::read(path).map_err(io)?);
    let file: KeyringFile =
        serde_json::from_slice(&bytes).map_err(|e| invalid(path, e.to_string()))?;
    Ok((file, stamp))
}

/// Every version of the file at `path`, unsealed with `seal` when the file
/// is sealed. The file and the server must agree on the seal: a plain file
/// under a configured seal (or the reverse, or another key) is refused
/// with the command that fixes it.
pub(super) fn load(
    path: &Path,
    seal: Option<&dyn KeyringSeal>,
) -> Result<(Vec<Material>, Stamp), KeyringError> {
    let (file, stamp) = read(path)?;
    Ok((unpack(path, &file, seal)?, stamp))
}

fn unpack(
    path: &Path,
    file: &KeyringFile,
    seal: Option<&dyn KeyringSeal>,
) -> Result<Vec<Material>, KeyringError> {
    let sealed_by = match (file.format.as_str(), &file.sealed_by, seal) {
        (FILE_FORMAT, None, None) => None,
        (FILE_FORMAT, None, Some(seal)) => {
            return Err(sealing(
                path,
                format!(
                    "the server is configured to seal the platform keyring with {} but this \
                     file is not sealed; seal it first: keybroker keyring seal --platform-key {}",
                    seal.name(),
                    seal.name()
                ),
            ));
        }
        (SEALED_FORMAT, Some(by), None) => {
            return Err(sealing(
                path,
                format!(
                    "the file is sealed by {} (an HSM key); start with --platform-key {} and the \
                     pkcs11_module and PIN of that HSM",
                    crate::text::Escaped(by),
                    crate::text::Escaped(by)
                ),
            ));
        }
        (SEALED_FORMAT, Some(by), Some(seal)) if *by != seal.name() => {
            return Err(sealing(
                path,
                format!(
                    "the file is sealed by {}, not by the configured {}; give --platform-key {} \
                     (or move it to the new key with keybroker keyring seal)",
                    crate::text::Escaped(by),
                    seal.name(),
                    crate::text::Escaped(by)
                ),
            ));
        }
        (SEALED_FORMAT, Some(_), Some(seal)) => Some(seal),
        (format, _, _) => {
            return Err(invalid(
                path,
                format!(
                    "format is {:?}, expected {FILE_FORMAT:?} (or {SEALED_FORMAT:?} with sealed_by)",
                    format
                ),
            ));
        }
    };
    let mut out = Vec::with_capacity(file.versions.len());
    for entry in &file.versions {
        let stored = Zeroizing::new(
            B64.decode(entry.key.as_bytes())
                .map_err(|_| invalid(path, format!("version {} is not base64", entry.version)))?,
        );
        let key = match sealed_by {
            None => SecretBytes::new(stored.to_vec()),
            Some(seal) => seal
                .unseal(&stored, &version_aad(entry.version, entry.created_unix))
                .map_err(|e| {
                    sealing(
                        path,
                        format!(
                            "version {} could not be unsealed by {}: {e}",
                            entry.version,
                            seal.name()
                        ),
                    )
                })?,
        };
        if key.len() != KEY_LEN {
            return Err(invalid(
                path,
                format!(
                    "version {} is {} bytes, expected {KEY_LEN}",
                    entry.version,
                    key.len()
                ),
            ));
        }
        if entry.version == 0 || out.iter().any(|m: &Material| m.version == entry.version) {
            return Err(invalid(
                path,
                format!("version {} is zero or repeated", entry.version),
            ));
        }
        out.push(Material {
            version: entry.version,
            created_unix: entry.created_unix,
            key,
            seal_only: entry.seal_only,
        });
    }
    if out.is_empty() {
        return Err(invalid(path, "no key versions"));
    }
    Ok(out)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `material` as the file stores it: base64, sealed first under a seal.
fn entry(
    path: &Path,
    version: u32,
    created_unix: u64,
    material: &SecretBytes,
    seal: Option<&dyn KeyringSeal>,
    seal_only: bool,
) -> Result<VersionEntry, KeyringError> {
    let key = match seal {
        None => Zeroizing::new(B64.encode(material.expose())),
        Some(seal) => {
            let sealed = seal
                .seal(material.expose(), &version_aad(version, created_unix))
                .map_err(|e| {
                    sealing(
                        path,
                        format!(
                            "version {version} could not be sealed by {}: {e}",
                            seal.name()
                        ),
                    )
                })?;
            Zeroizing::new(B64.encode(sealed))
        }
    };
    Ok(VersionEntry {
        version,
        created_unix,
        key,
        seal_only,
    })
}

fn new_entry(
    path: &Path,
    version: u32,
    seal: Option<&dyn KeyringSeal>,
) -> Result<VersionEntry, KeyringError> {
    let material = SecretBytes::random(KEY_LEN).map_err(|_| KeyringError::Random)?;
    entry(path, version, now_unix(), &material, seal, true)
}

fn header(seal: Option<&dyn KeyringSeal>) -> (String, Option<String>) {
    match seal {
        None => (FILE_FORMAT.into(), None),
        Some(seal) => (SEALED_FORMAT.into(), Some(seal.name())),
    }
}

/// Creates a keyring file of one fresh version (sealed under `seal`).
pub(super) fn create(path: &Path, seal: Option<&dyn KeyringSeal>) -> Result<(), KeyringError> {
    let (format, sealed_by) = header(seal);
    let file = KeyringFile {
        format,
        sealed_by,
        versions: vec![new_entry(path, 1, seal)?],
    };
    write_atomically(path, &file)
}

/// Adds a new newest version to the keyring file (creating the file if
/// absent); returns its number. Old versions stay, so every key wrapped
/// before keeps unwrapping. A sealed file needs its seal.
pub fn rotate_keyring_file(
    path: &Path,
    seal: Option<&dyn KeyringSeal>,
) -> Result<u32, KeyringError> {
    // Read-modify-write: two rotations at once (a CLI and a server's
    // automatic rotation) must not both add the same number.
    let _lock = Locked::take(path)?;
    if !path.exists() {
        // Nothing to rotate yet: the first version is the new one.
        create(path, seal)?;
        return Ok(1);
    }
    let (mut file, _) = read(path)?;
    // Validate every version (and the seal) before rewriting the file.
    let versions = unpack(path, &file, seal)?;
    let next = versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
    file.versions.push(new_entry(path, next, seal)?);
    write_atomically(path, &file)?;
    Ok(next)
}

/// Rewrites the keyring file with every version sealed under `to` (or
/// plain, `None`), reading it with `from`: moving the platform keyring
/// into an HSM, to another HSM key, or out. The versions, their numbers and
/// their creation times are unchanged, so every wrapped key stays readable.
/// Returns how many versions were rewritten.
pub fn reseal_keyring_file(
    path: &Path,
    from: Option<&dyn KeyringSeal>,
    to: Option<&dyn KeyringSeal>,
) -> Result<usize, KeyringError> {
    let _lock = Locked::take(path)?;
    let (versions, _) = load(path, from)?;
    let (format, sealed_by) = header(to);
    let file = KeyringFile {
        format,
        sealed_by,
        versions: versions
            .iter()
            .map(|m| entry(path, m.version, m.created_unix, &m.key, to, m.seal_only))
            .collect::<Result<_, _>>()?,
    };
    // The new file is proven readable before it replaces the old one.
    unpack(path, &file, to)?;
    write_atomically(path, &file)?;
    Ok(file.versions.len())
}

/// Writes to a 0600 temp file beside `path`, syncs, then renames over it:
/// readers see the old or the new keyring, never a partial one.
fn write_atomically(path: &Path, file: &KeyringFile) -> Result<(), KeyringError> {
    let io = |cause| KeyringError::Io {
        path: path.to_owned(),
        cause,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let json =
        Zeroizing::new(serde_json::to_vec_pretty(file).map_err(|e| invalid(path, e.to_string()))?);
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    out.write_all(&json).map_err(io)?;
    out.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename itself is durable only once the directory is synced: a
    // crash must not bring back the keyring without its newest version.
    std::fs::File::open(dir_of(path))
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// An exclusive advisory lock on `<keyring>.lock` beside the keyring,
/// held for one read-modify-write of the file; released when dropped.
struct Locked {
    _held: std::fs::File,
}

impl Locked {
    fn take(path: &Path) -> Result<Self, KeyringError> {
        let io = |cause| KeyringError::Io {
            path: path.to_owned(),
            cause,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir_of(path))
            .map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path.with_extension("lock"))
            .map_err(io)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io(e.into()))?;
        Ok(Self { _held: file })
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
