//! Facts the layers below the API add to the audit record of the call they
//! run in: provider calls, DEK loads, the provider's request id. Task-local,
//! so no signature changes through the layers, and a leaf module, so the
//! providers note facts without importing the audit log above them.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Facts the layers below the API add to the record of the current call.
#[derive(Debug, Default)]
pub struct CallNotes {
    provider_calls: AtomicU32,
    /// DEKs this call loaded rather than found in the cache (a provider
    /// call, or a local unseal under a cached tenant key).
    dek_loads: AtomicU32,
    /// Written by the provider that made the call; read once at the end.
    provider_request_id: Mutex<Option<String>>,
}

impl CallNotes {
    pub fn provider_calls(&self) -> u32 {
        self.provider_calls.load(Ordering::Relaxed)
    }

    pub fn dek_loads(&self) -> u32 {
        self.dek_loads.load(Ordering::Relaxed)
    }

    pub fn provider_request_id(&self) -> Option<String> {
        self.provider_request_id.lock().clone()
    }
}

tokio::task_local! {
    static NOTES: Arc<CallNotes>;
}

/// `call`, with `notes` collecting what the layers below note of it.
pub fn scoped<F: Future>(notes: Arc<CallNotes>, call: F) -> impl Future<Output = F::Output> {
    NOTES.scope(notes, call)
}

/// The current call asked a provider (KMS or keyring) for something.
pub fn note_provider_call() {
    let _ = NOTES.try_with(|n| n.provider_calls.fetch_add(1, Ordering::Relaxed));
}

/// The current call loaded a DEK the cache did not have.
pub fn note_dek_load() {
    let _ = NOTES.try_with(|n| n.dek_loads.fetch_add(1, Ordering::Relaxed));
}

/// The provider's id of the request just made, if the SDK gave one.
pub fn note_provider_request(id: Option<&str>) {
    if let Some(id) = id {
        let _ = NOTES.try_with(|n| {
            *n.provider_request_id.lock() = Some(id.to_owned());
        });
    }
}
