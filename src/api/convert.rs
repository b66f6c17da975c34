//! Domain values as protobuf messages, shared by both services.

use crate::control::Reencryption;
use crate::keys::{BindingState, KeyHierarchy, KeyInfo};
use crate::proto;

/// A registry time (ms since the Unix epoch) as a protobuf timestamp.
pub(crate) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A timestamp as unix milliseconds (the inverse of [`timestamp`]).
pub(crate) fn millis(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000)
}

pub(crate) fn key_state(state: BindingState) -> proto::KeyState {
    match state {
        BindingState::Active => proto::KeyState::Active,
        BindingState::Disabled => proto::KeyState::Disabled,
        BindingState::Revoked => proto::KeyState::Revoked,
    }
}

pub(crate) fn hierarchy_to_proto(hierarchy: KeyHierarchy) -> proto::KeyHierarchy {
    match hierarchy {
        KeyHierarchy::TenantKey => proto::KeyHierarchy::TenantKey,
        KeyHierarchy::Direct => proto::KeyHierarchy::Direct,
    }
}

pub(crate) fn reencryption_to_proto(r: Reencryption) -> proto::Reencryption {
    proto::Reencryption {
        target: r.target,
        versions_done: r.versions_done,
        versions_total: r.versions_total,
        in_progress: r.in_progress,
    }
}

/// Consumes the `KeyInfo`: its version string moves, only the binding name
/// is copied (this runs on every UnwrapKey).
pub(crate) fn key_info(key: KeyInfo) -> proto::KeyInfo {
    proto::KeyInfo {
        // `String::from`, not `to_string`: no formatter on the hot path.
        key_binding: String::from(&*key.key_binding),
        provider: proto::Provider::from(key.provider).into(),
        provider_key_version: key.key_version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_before_the_epoch_keep_nanos_positive() {
        let t = timestamp(-1);
        assert_eq!((t.seconds, t.nanos), (-1, 999_000_000));
        let t = timestamp(1_500);
        assert_eq!((t.seconds, t.nanos), (1, 500_000_000));
    }
}
