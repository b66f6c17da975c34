//! Keys in a PKCS#11 token (an HSM; SoftHSM in tests), through `cryptoki`.
//!
//! The module is the platform's, configured on the server
//! (`pkcs11_module`, an allow-list of one: a LinkKey caller never names a
//! library to load), and so is the PIN (`pkcs11_pin_file` only: never a
//! flag, never the environment, which children inherit and /proc shows;
//! read once into a zeroizing buffer). A binding names the token and the
//! key object: `pkcs11:token=<label>;object=<label>`, and a tenant may name
//! only objects of its own namespace (`pkcs11_tenant_label_prefix`), never
//! the key that seals the platform keyring: the PIN unlocks every object
//! on the token, so the label is the proof of ownership.
//! The key is an AES-256 secret key on the token; keybroker wraps with
//! CKM_AES_GCM, a 96-bit IV drawn by the host, the tenant and context as
//! AAD, and stores IV ‖ ciphertext ‖ tag. PKCS#11 sessions are not
//! free-threaded: each token has a bounded pool of logged-in sessions
//! (`pkcs11_sessions`), and every call runs on the blocking pool, never on
//! the async runtime.

mod reference;

pub use self::reference::{Pkcs11KeyRef, Pkcs11Settings};

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::kms::{
    Ciphertext, InvalidIdentifier, KeyDescription, KeyProvider, ProviderError, ProviderKeyState,
    ProviderKind, WrapContext,
};
use crate::secret::SecretBytes;

const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;

/// Classifies a PKCS#11 return value (a pure function; table test below).
pub(crate) fn classify(err: &CkError, key: &str) -> ProviderError {
    let CkError::Pkcs11(rv, function) = err else {
        return ProviderError::Internal(format!("PKCS#11 call on {key} failed: {err}"));
    };
    let what = format!("{function:?} on {key}: {rv:?}");
    match rv {
        RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid => ProviderError::NotFound(
            format!("{what}: the key is no longer on the token (destroyed?)"),
        ),
        RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => {
            ProviderError::InvalidCiphertext(format!(
                "{what}: wrong tenant or context, or an altered wrapped key"
            ))
        }
        // SoftHSM answers a failed AES-GCM tag check with
        // CKR_GENERAL_ERROR. On C_Decrypt it is read as the caller's bytes:
        // never a key state, only this request fails.
        RvError::GeneralError if matches!(function, Function::Decrypt) => {
            ProviderError::InvalidCiphertext(format!(
                "{what}: the token could not decrypt it (wrong tenant or context, or an altered wrapped key)"
            ))
        }
        RvError::PinIncorrect
        | RvError::PinLocked
        | RvError::PinExpired
        | RvError::UserNotLoggedIn => ProviderError::AccessDenied(format!(
            "{what}: check the token PIN keybroker is given (pkcs11_pin_file)"
        )),
        RvError::KeyFunctionNotPermitted | RvError::KeyTypeInconsistent => {
            ProviderError::KeyDisabled(format!(
                "{what}: the key may not encrypt/decrypt with AES-GCM (CKA_ENCRYPT, CKA_DECRYPT)"
            ))
        }
        RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::DeviceMemory
        | RvError::HostMemory
        | RvError::TokenNotPresent
        | RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::FunctionFailed => {
            ProviderError::Unavailable(format!("{what}: the token is unavailable; retry"))
        }
        _ => ProviderError::Internal(what),
    }
}

/// One token's logged-in sessions. A plain lock: a pop or a push, never held
/// across a PKCS#11 call.
struct TokenPool {
    slot: Slot,
    idle: Mutex<Vec<Session>>,
    /// Bounds the sessions (and calls) in flight on the token.
    permits: Arc<tokio::sync::Semaphore>,
}

/// The platform's PKCS#11 module, initialized once.
pub struct Pkcs11Hsm {
    ctx: Pkcs11,
    pin: AuthPin,
    sessions: usize,
    /// Session pools by token label. A plain lock: map access only.
    tokens: Mutex<HashMap<String, Arc<TokenPool>>>,
    /// Encrypt/decrypt calls made (tests count them).
    pub calls: Arc<std::sync::atomic::AtomicU64>,
    /// `pkcs11_tenant_label_prefix`.
    tenant_label_prefix: String,
    /// The key that seals the platform keyring (`platform_key`): no
    /// tenant's.
    platform_key: Option<String>,
}

impl fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Hsm {
    /// Loads and initializes the configured module; `None` without one.
    pub fn from_settings(settings: &Pkcs11Settings) -> Result<Option<Self>, ProviderError> {
        let Some(module) = &settings.module else {
            return Ok(None);
        };
        if std::env::var_os("KEYBROKER_PKCS11_PIN").is_some() {
            return Err(ProviderError::Internal(
                "KEYBROKER_PKCS11_PIN is no longer read: a PIN in the environment is inherited by child processes and readable in /proc; put it in a 0600 file and set pkcs11_pin_file".into(),
            ));
        }
        let path = settings.pin_file.as_ref().ok_or_else(|| {
            ProviderError::Internal(
                "pkcs11_module is set but no PIN: set pkcs11_pin_file (a 0600 file)".into(),
            )
        })?;
        let read = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            ProviderError::Internal(format!("pkcs11_pin_file {}: {e}", path.display()))
        })?);
        // AuthPin zeroizes its copy; the file's text is zeroized here.
        let pin = read.trim_end_matches(['\n', '\r']).to_owned();
        let ctx = Pkcs11::new(module).map_err(|e| {
            ProviderError::Internal(format!(
                "cannot load PKCS#11 module {}: {e}",
                module.display()
            ))
        })?;
        // Already initialized by another user of the module in this process
        // (cryptoki loads it once): that initialization serves us too.
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(ProviderError::Internal(format!("C_Initialize: {e}"))),
        }
        Ok(Some(Self {
            ctx,
            pin: AuthPin::new(pin.into()),
            sessions: settings.sessions,
            tokens: Mutex::new(HashMap::new()),
            calls: Arc::default(),
            tenant_label_prefix: settings.tenant_label_prefix.clone(),
            platform_key: None,
        }))
    }

    /// Reserves the key that seals the platform keyring.
    pub fn with_platform_key(mut self, platform_key: Option<String>) -> Self {
        self.platform_key = platform_key;
        self
    }

    /// Whether `tenant_id` may link `key` (no HSM call).
    pub fn check_owner(&self, tenant_id: &str, key: &Pkcs11KeyRef) -> Result<(), String> {
        key.check_owner(
            tenant_id,
            &self.tenant_label_prefix,
            self.platform_key.as_deref(),
        )
    }

    /// The provider for one key object.
    pub fn key(self: &Arc<Self>, key: Pkcs11KeyRef) -> Pkcs11Key {
        Pkcs11Key {
            hsm: Arc::clone(self),
            name: key.to_string(),
            key,
        }
    }

    fn pool(&self, token: &str, name: &str) -> Result<Arc<TokenPool>, ProviderError> {
        let mut tokens = self.tokens.lock();
        if let Some(pool) = tokens.get(token) {
            return Ok(Arc::clone(pool));
        }
        let slot = self
            .ctx
            .get_slots_with_token()
            .map_err(|e| classify(&e, name))?
            .into_iter()
            .find(|slot| {
                self.ctx
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == token)
            })
            .ok_or_else(|| {
                ProviderError::NotFound(format!("{name}: no token labelled {token:?} in the HSM"))
            })?;
        let pool = Arc::new(TokenPool {
            slot,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(self.sessions)),
        });
        tokens.insert(token.to_owned(), Arc::clone(&pool));
        Ok(pool)
    }

    /// Runs `op` with a logged-in session of `token`, on the blocking pool.
    async fn with_session<T: Send + 'static>(
        self: &Arc<Self>,
        token: &str,
        name: &str,
        op: impl FnOnce(&Session) -> Result<T, ProviderError> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let hsm = Arc::clone(self);
        let (token, name) = (token.to_owned(), name.to_owned());
        tokio::task::spawn_blocking(move || hsm.in_session(&token, &name, op))
            .await
            .map_err(|e| ProviderError::Internal(format!("PKCS#11 task failed: {e}")))?
    }

    /// Runs `op` with a logged-in session of `token` on this thread, which
    /// may block (the blocking pool, or loading the platform keyring).
    fn in_session<T>(
        &self,
        token: &str,
        name: &str,
        op: impl FnOnce(&Session) -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let pool = self.pool(token, name)?;
        // The semaphore bounds the sessions to `pkcs11_sessions` per token.
        let _permit = futures::executor::block_on(Arc::clone(&pool.permits).acquire_owned())
            .map_err(|_| ProviderError::Internal("session pool closed".into()))?;
        let idle = pool.idle.lock().pop();
        let session = match idle {
            Some(session) => session,
            None => {
                let session = self
                    .ctx
                    .open_rw_session(pool.slot)
                    .map_err(|e| classify(&e, name))?;
                match session.login(UserType::User, Some(&self.pin)) {
                    Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                    Err(e) => return Err(classify(&e, name)),
                }
                session
            }
        };
        let result = op(&session);
        // A session the token dropped is not reused.
        let broken = matches!(&result, Err(ProviderError::Unavailable(_)));
        if !broken {
            pool.idle.lock().push(session);
        }
        result
    }
}

/// AES-GCM on the token under the key labelled `object`: IV ‖ ciphertext ‖ tag.
fn gcm_encrypt(
    session: &Session,
    object: &str,
    name: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, ProviderError> {
    let mut iv = [0u8; IV_LEN];
    aws_lc_rs::rand::fill(&mut iv)
        .map_err(|_| ProviderError::Internal("system random generator failed".into()))?;
    let key = find_key(session, object, name)?;
    let mut iv_param = iv;
    let params = GcmParams::new(&mut iv_param, aad, TAG_BITS.into())
        .map_err(|e| ProviderError::Internal(format!("GCM parameters: {e}")))?;
    let sealed = session
        .encrypt(&Mechanism::AesGcm(params), key, plaintext)
        .map_err(|e| classify(&e, name))?;
    let mut bytes = Vec::with_capacity(IV_LEN + sealed.len());
    bytes.extend_from_slice(&iv);
    bytes.extend_from_slice(&sealed);
    Ok(bytes)
}

/// The inverse of [`gcm_encrypt`].
fn gcm_decrypt(
    session: &Session,
    object: &str,
    name: &str,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<SecretBytes, ProviderError> {
    if ciphertext.len() < IV_LEN + 16 {
        return Err(ProviderError::InvalidCiphertext(format!(
            "{name}: the wrapped key is too short to be AES-GCM"
        )));
    }
    let (iv, sealed) = ciphertext.split_at(IV_LEN);
    let mut iv = <[u8; IV_LEN]>::try_from(iv).unwrap_or_default();
    let key = find_key(session, object, name)?;
    let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())
        .map_err(|e| ProviderError::Internal(format!("GCM parameters: {e}")))?;
    session
        .decrypt(&Mechanism::AesGcm(params), key, sealed)
        .map(SecretBytes::new)
        .map_err(|e| classify(&e, name))
}

/// The seal of the platform keyring that `platform_key` names (a
/// `pkcs11:` reference on the configured module); `None` without one.
pub fn platform_seal(
    hsm: Option<&Arc<Pkcs11Hsm>>,
    platform_key: Option<&str>,
) -> Result<Option<Arc<dyn crate::kms::local::KeyringSeal>>, ProviderError> {
    let Some(reference) = platform_key else {
        return Ok(None);
    };
    let key = Pkcs11KeyRef::parse(reference).map_err(|e| ProviderError::Internal(e.0))?;
    let hsm = hsm.ok_or_else(|| {
        ProviderError::Internal(
            "platform_key names a PKCS#11 key but pkcs11_module is not configured".into(),
        )
    })?;
    Ok(Some(Arc::new(hsm.key(key))))
}

/// One key object as a [`KeyProvider`].
pub struct Pkcs11Key {
    hsm: Arc<Pkcs11Hsm>,
    key: Pkcs11KeyRef,
    name: String,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("key", &self.name)
            .finish()
    }
}

/// The platform keyring sealed at rest under this key (`serve
/// --platform-key pkcs11:...`): each version is AES-GCM-encrypted on the
/// token, with its number and creation time as AAD.
impl crate::kms::local::KeyringSeal for Pkcs11Key {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn seal(&self, material: &[u8], aad: &[u8]) -> Result<Vec<u8>, ProviderError> {
        self.hsm
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.hsm.in_session(&self.key.token, &self.name, |session| {
            gcm_encrypt(session, &self.key.object, &self.name, material, aad)
        })
    }

    fn check(&self) -> Result<(), ProviderError> {
        self.hsm.in_session(&self.key.token, &self.name, |session| {
            find_key(session, &self.key.object, &self.name).map(|_| ())
        })
    }

    fn unseal(&self, sealed: &[u8], aad: &[u8]) -> Result<SecretBytes, ProviderError> {
        self.hsm
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.hsm.in_session(&self.key.token, &self.name, |session| {
            gcm_decrypt(session, &self.key.object, &self.name, sealed, aad)
        })
    }
}

/// The AES secret key labelled `object`.
fn find_key(session: &Session, object: &str, name: &str) -> Result<ObjectHandle, ProviderError> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(object.as_bytes().to_vec()),
        ])
        .map_err(|e| classify(&e, name))?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(ProviderError::NotFound(format!(
            "{name}: no AES key with that label on the token (destroyed, or never made)"
        ))),
        _ => Err(ProviderError::Internal(format!(
            "{name}: {} AES keys share that label; keybroker needs exactly one",
            found.len()
        ))),
    }
}

#[async_trait]
impl KeyProvider for Pkcs11Key {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Pkcs11
    }

    async fn encrypt(
        &self,
        plaintext: &SecretBytes,
        wrap: WrapContext<'_>,
    ) -> Result<Ciphertext, ProviderError> {
        let aad = wrap.aad();
        let plaintext = SecretBytes::new(plaintext.expose().to_vec());
        let (object, name) = (self.key.object.clone(), self.name.clone());
        self.hsm
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bytes = self
            .hsm
            .with_session(&self.key.token, &self.name, move |session| {
                gcm_encrypt(session, &object, &name, plaintext.expose(), &aad)
            })
            .await?;
        Ok(Ciphertext {
            bytes,
            key_version: String::new(),
        })
    }

    async fn decrypt(
        &self,
        _key_version: &str,
        ciphertext: &[u8],
        wrap: WrapContext<'_>,
    ) -> Result<SecretBytes, ProviderError> {
        let aad = wrap.aad();
        let ciphertext = ciphertext.to_vec();
        let (object, name) = (self.key.object.clone(), self.name.clone());
        self.hsm
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.hsm
            .with_session(&self.key.token, &self.name, move |session| {
                gcm_decrypt(session, &object, &name, &ciphertext, &aad)
            })
            .await
    }

    async fn describe(&self) -> Result<KeyDescription, ProviderError> {
        let (object, name) = (self.key.object.clone(), self.name.clone());
        let usable = self
            .hsm
            .with_session(&self.key.token, &self.name, move |session| {
                let key = find_key(session, &object, &name)?;
                let attributes = session
                    .get_attributes(key, &[AttributeType::Encrypt, AttributeType::Decrypt])
                    .map_err(|e| classify(&e, &name))?;
                Ok(attributes
                    .iter()
                    .all(|a| matches!(a, Attribute::Encrypt(true) | Attribute::Decrypt(true))))
            })
            .await?;
        Ok(if usable {
            KeyDescription::default()
        } else {
            KeyDescription {
                state: ProviderKeyState::Disabled,
                reason: format!(
                    "{} may not encrypt and decrypt (CKA_ENCRYPT, CKA_DECRYPT are false)",
                    self.name
                ),
                ..KeyDescription::default()
            }
        })
    }

    /// Keybroker writes no version for PKCS#11 keys: any is forged.
    fn check_version(&self, version: &str) -> Result<(), ProviderError> {
        if version.is_empty() {
            return Ok(());
        }
        Err(ProviderError::InvalidCiphertext(format!(
            "the wrapped key names key version {} for a PKCS#11 key; keybroker never writes one there",
            crate::text::Quoted(version)
        )))
    }
}

#[cfg(test)]
mod tests;
