//! Key changes as the control plane starts them: the state machine itself
//! (begin, move, finish, resume) is `crate::lifecycle`'s.

use super::{Admin, AdminError};
use crate::keys::PLATFORM_BINDING;
use crate::lifecycle::{Change, ChangeStatus};
use crate::registry::Tenant;

/// A tenant's key versions and any key change moving them.
pub type Reencryption = ChangeStatus;

impl Admin {
    /// The key-change status of a tenant.
    pub async fn reencryption(&self, tenant: &Tenant) -> Result<Reencryption, AdminError> {
        Ok(self.lifecycle.change_status(tenant).await?)
    }

    /// Moves every tenant key version of `tenant_id` to `target` (making it
    /// primary unless it is the platform key), and on finishing disables
    /// `then_disable` (name, reason). A change under way to another target
    /// finishes first.
    pub(super) async fn change_key(
        &self,
        tenant_id: &str,
        target: &str,
        then_disable: Option<(String, String)>,
    ) -> Result<Reencryption, AdminError> {
        let change = Change {
            target: target.to_owned(),
            make_primary: target != PLATFORM_BINDING,
            then_disable,
        };
        Ok(self.lifecycle.change_key(tenant_id, &change).await?)
    }

    /// Finishes every key change a crash interrupted (at start).
    pub async fn resume_key_changes(&self) -> Result<usize, AdminError> {
        Ok(self.lifecycle.resume_key_changes(false).await?)
    }
}
