//! `kb admin key import-parameters` and `kb admin key import --wrap-with`:
//! wrapped key import from the command line. The material is wrapped here,
//! on the customer's machine, to the one-time public key of the parameters
//! (or by openssl, see docs/keys.md), so only keybroker can open it.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::proto;
use crate::wrapping::Wrapping;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum WrappingArg {
    /// RSA-OAEP-SHA-256 of the material.
    RsaesOaepSha256,
    /// An AES-256 key RSA-OAEP-SHA-256 encrypted, then the material under
    /// it with AES key wrap with padding (CKM_RSA_AES_KEY_WRAP).
    RsaAesKeyWrapSha256,
}

impl From<WrappingArg> for proto::WrappingAlgorithm {
    fn from(w: WrappingArg) -> Self {
        match w {
            WrappingArg::RsaesOaepSha256 => Self::RsaesOaepSha256,
            WrappingArg::RsaAesKeyWrapSha256 => Self::RsaAesKeyWrapSha256,
        }
    }
}

/// The parameters as `import-parameters` writes them (JSON).
pub(super) fn parameters_json(p: &proto::GetImportParametersResponse) -> Value {
    let ms = p
        .expire_time
        .as_ref()
        .map_or(0, crate::api::convert::millis);
    json!({
        "tenant_id": p.tenant_id,
        "name": p.name,
        "import_token": p.import_token,
        "wrapping_algorithm": Wrapping::from(p.wrapping_algorithm()).as_str(),
        "public_key_pem": p.public_key_pem,
        "expire_time": crate::text::rfc3339(ms),
    })
}

impl From<proto::WrappingAlgorithm> for Wrapping {
    fn from(w: proto::WrappingAlgorithm) -> Self {
        match w {
            proto::WrappingAlgorithm::RsaAesKeyWrapSha256 => Self::RsaAesKeyWrapSha256,
            _ => Self::RsaesOaepSha256,
        }
    }
}

/// What an import with `--wrap-with` sends: (token, wrapped material), for
/// the tenant and key the parameters were issued for.
pub(super) struct Wrapped {
    pub(super) tenant_id: String,
    pub(super) name: String,
    pub(super) token: String,
    pub(super) material: Vec<u8>,
}

/// Reads parameters, and either wraps the base64 material of
/// `material_b64` to their key or takes `already_wrapped` (raw bytes, as
/// `openssl pkeyutl` writes them).
pub(super) fn wrap_with(
    params_path: &Path,
    material_b64: Option<&str>,
    already_wrapped: Option<&Path>,
) -> anyhow::Result<Wrapped> {
    let text = std::fs::read_to_string(params_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", params_path.display()))?;
    let params: Value = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not the JSON of `kb admin key import-parameters`: {e}",
            params_path.display()
        )
    })?;
    let field = |name: &str| {
        params[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("{}: no {name}", params_path.display()))
    };
    let wrapping: Wrapping = field("wrapping_algorithm")?
        .parse()
        .map_err(|_| anyhow::anyhow!("{}: unknown wrapping_algorithm", params_path.display()))?;
    let material = match (material_b64, already_wrapped) {
        (Some(b64), None) => {
            let raw = zeroize::Zeroizing::new(
                B64.decode(b64.trim())
                    .map_err(|e| anyhow::anyhow!("the key material is not base64: {e}"))?,
            );
            crate::wrapping::wrap(&field("public_key_pem")?, wrapping, &raw)
                .map_err(anyhow::Error::msg)?
        }
        (None, Some(path)) => {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        _ => anyhow::bail!("give --material-file or --wrapped-material-file"),
    };
    Ok(Wrapped {
        tenant_id: field("tenant_id")?,
        name: field("name")?,
        token: field("import_token")?,
        material,
    })
}
