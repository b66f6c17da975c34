//! Types that hold key material. They zeroize their bytes on drop and never
//! print them: `Debug` shows only the length. Public data lives elsewhere, so
//! a type's name tells whether it may be logged.

use std::fmt;

use zeroize::Zeroizing;

/// Plaintext key bytes (a DEK, or raw key material on its way into a keyring).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// `len` cryptographically random bytes.
    pub fn random(len: usize) -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        aws_lc_rs::rand::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// The key bytes. Callers must not copy them into non-zeroizing storage
    /// except where they leave the process (a gRPC response).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl SecretBytes {
    /// The bytes as a gRPC response field, without a copy: the buffer is
    /// zeroized when the response lets go of it.
    pub fn into_response_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(ResponseBytes(self))
    }
}

/// [`SecretBytes`] lent to a response.
struct ResponseBytes(SecretBytes);

impl AsRef<[u8]> for ResponseBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.expose()
    }
}

/// The process's allocator (`src/main.rs`): mimalloc, with every block
/// zeroed when freed (1Password's `zeroizing-alloc`). keybroker zeroizes the
/// buffers it owns; this wipes the ones it does not once they are freed: a
/// response's encode buffer, hyper's and rustls's, the cloud SDKs' JSON.
pub type ZeroOnFree = zeroizing_alloc::ZeroAlloc<mimalloc::MiMalloc>;

/// The value of [`ZeroOnFree`].
pub const ZERO_ON_FREE: ZeroOnFree = zeroizing_alloc::ZeroAlloc(mimalloc::MiMalloc);

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<redacted {} bytes>)", self.0.len())
    }
}

/// A URL that may carry a password (a database URL). `Debug` and `Display`
/// redact it: `scheme://user:<redacted>@host/db`, and any `password=` query
/// parameter; [`expose`](Self::expose) gives the real one to the driver.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Zeroizing<String>);

impl SecretUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced, safe to log.
    pub fn redacted(&self) -> String {
        let url = self.0.as_str();
        let mut out = url.to_owned();
        if let Some((scheme, rest)) = url.split_once("://")
            && let Some((userinfo, host)) = rest.split_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            out = format!("{scheme}://{user}:<redacted>@{host}");
        }
        if let Some(i) = out.find("password=") {
            let end = out[i..].find('&').map_or(out.len(), |j| i + j);
            out.replace_range(i + "password=".len()..end, "<redacted>");
        }
        out
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(Zeroizing::new(text.to_owned())))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_never_show_their_password() {
        let url: SecretUrl = "postgres://kb:s3cret@db:5432/kb?sslmode=require&password=other"
            .parse()
            .unwrap();
        for shown in [format!("{url:?}"), url.to_string()] {
            assert!(
                !shown.contains("s3cret") && !shown.contains("other"),
                "{shown}"
            );
            assert!(shown.contains("kb:<redacted>@db:5432"), "{shown}");
        }
        assert!(url.expose().contains("s3cret"));
        let plain: SecretUrl = "sqlite:///var/lib/kb.db".parse().unwrap();
        assert_eq!(plain.to_string(), "sqlite:///var/lib/kb.db");
    }

    #[test]
    fn debug_never_shows_bytes() {
        let secret = SecretBytes::new(vec![0xAB; 32]);
        let shown = format!("{secret:?} {secret:#?}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
        assert!(shown.contains("32 bytes"));
    }

    #[test]
    fn response_bytes_are_the_secret_itself() {
        let secret = SecretBytes::new(vec![7; 32]);
        let at = secret.expose().as_ptr();
        let bytes = secret.into_response_bytes();
        assert_eq!(bytes.as_ptr(), at, "no copy");
        assert_eq!(&bytes[..], &[7; 32]);
    }

    #[test]
    fn random_bytes_differ() {
        let a = SecretBytes::random(32).unwrap();
        let b = SecretBytes::random(32).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a.expose(), b.expose());
    }
}
