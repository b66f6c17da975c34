//! What the load sends: tenants' wrapped keys (generated and warmed up
//! front), the request of each kind with this process's access reason, and
//! the count of key uses the server's access log must match.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keybroker::proto::key_broker_client::KeyBrokerClient;
use keybroker::proto::{GenerateDataKeyRequest, UnwrapKeyRequest};
use tonic::transport::Channel;

use crate::pb::GetRequest;
use crate::pb::floor_client::FloorClient;

/// Key uses this process made whose answer came back (each
/// GenerateDataKey and UnwrapKey, each batch item): what the server's key
/// access log must count, exactly.
static KEY_USES: AtomicU64 = AtomicU64::new(0);

fn used(n: u64) {
    KEY_USES.fetch_add(n, Ordering::Relaxed);
}

/// The uses counted since the last [`reset_uses`].
pub(crate) fn uses_made() -> u64 {
    KEY_USES.load(Ordering::SeqCst)
}

/// A new server: its access log starts at zero.
pub(crate) fn reset_uses() {
    KEY_USES.store(0, Ordering::SeqCst);
}

/// A wrapped key and its tenant.
#[derive(Debug, Clone)]
pub(crate) struct Wrapped {
    pub(crate) tenant: Arc<str>,
    pub(crate) key: Vec<u8>,
}

/// `per_tenant` wrapped keys of each of `tenants` (tenants generating at
/// the same time, each one key after the other), interleaved: the `i`-th
/// key is tenant `i % tenants`'s, so consecutive requests change tenant.
pub(crate) async fn generate_keys(
    client: KeyBrokerClient<Channel>,
    tenants: &[Arc<str>],
    per_tenant: usize,
) -> anyhow::Result<Vec<Wrapped>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (t, tenant) in tenants.iter().enumerate() {
        let (mut client, tenant) = (client.clone(), Arc::clone(tenant));
        tasks.spawn(async move {
            let mut keys = Vec::with_capacity(per_tenant);
            for _ in 0..per_tenant {
                let reply = client.generate_data_key(generate_request(&tenant)).await;
                used(1);
                keys.push(Wrapped {
                    tenant: Arc::clone(&tenant),
                    key: reply?.into_inner().wrapped_key,
                });
            }
            Ok::<_, anyhow::Error>((t, keys))
        });
    }
    let mut by_tenant = vec![Vec::new(); tenants.len()];
    while let Some(done) = tasks.join_next().await {
        let (t, keys) = done??;
        by_tenant[t] = keys;
    }
    let mut columns: Vec<_> = by_tenant.into_iter().map(Vec::into_iter).collect();
    Ok((0..per_tenant)
        .flat_map(|_| {
            columns
                .iter_mut()
                .filter_map(Iterator::next)
                .collect::<Vec<_>>()
        })
        .collect())
}

/// The access reason every request of this process gives (`--reason`).
static REASON: std::sync::OnceLock<keybroker::access::Reason> = std::sync::OnceLock::new();

/// Every request gives `reason` from now on (once per process).
pub(crate) fn set_reason(reason: Option<keybroker::access::Reason>) {
    if let Some(reason) = reason {
        let _ = REASON.set(reason);
    }
}

pub(crate) fn justification() -> Option<keybroker::proto::AccessJustification> {
    REASON.get().map(|r| keybroker::proto::AccessJustification {
        reason: r.to_proto(),
        detail: String::new(),
    })
}

/// Unwraps every key once, so the measured runs are all cache hits
/// (16 at a time).
pub(crate) async fn unwrap_all(
    client: &KeyBrokerClient<Channel>,
    keys: &Arc<Vec<Wrapped>>,
) -> anyhow::Result<()> {
    const LANES: usize = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..LANES {
        let (mut client, keys) = (client.clone(), Arc::clone(keys));
        tasks.spawn(async move {
            for key in keys.iter().skip(lane).step_by(LANES) {
                let reply = client.unwrap_key(unwrap_request(key)).await;
                used(1);
                reply?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// What one request of a run sends.
#[derive(Clone)]
pub(crate) enum Target {
    Floor(FloorClient<Channel>, Arc<Vec<Wrapped>>),
    Broker {
        client: KeyBrokerClient<Channel>,
        warm: Arc<Vec<Wrapped>>,
        cold: Arc<Vec<Wrapped>>,
        next_cold: Arc<AtomicU64>,
        hit_ratio: f64,
    },
    /// BatchUnwrapKey of `size` cached keys per request.
    Batch {
        client: KeyBrokerClient<Channel>,
        warm: Arc<Vec<Wrapped>>,
        size: usize,
    },
    /// GenerateDataKey of the tenants in turn.
    Generate(KeyBrokerClient<Channel>, Arc<Vec<Arc<str>>>),
    /// An OpenBao Transit call over HTTP/1.1: one of `requests` (URL and
    /// body, cycled) POSTed, as Vault clients do (`peer`).
    Http {
        client: reqwest::Client,
        token: Arc<str>,
        requests: Arc<Vec<(String, String)>>,
    },
}

/// A GenerateDataKey of `tenant`, with this process's reason.
fn generate_request(tenant: &str) -> GenerateDataKeyRequest {
    GenerateDataKeyRequest {
        tenant_id: tenant.to_owned(),
        key_spec: 0,
        context: context(),
        justification: justification(),
    }
}

/// An UnwrapKey of `key`, with this process's reason.
pub(crate) fn unwrap_request(key: &Wrapped) -> UnwrapKeyRequest {
    UnwrapKeyRequest {
        tenant_id: key.tenant.to_string(),
        wrapped_key: key.key.clone().into(),
        context: context(),
        justification: justification(),
    }
}

pub(crate) fn context() -> std::collections::BTreeMap<String, String> {
    [("table".to_owned(), "bench".to_owned())].into()
}

impl Target {
    pub(crate) fn deks_per_request(&self) -> u64 {
        match self {
            Self::Batch { size, .. } => *size as u64,
            _ => 1,
        }
    }

    pub(crate) async fn call(&mut self, i: u64) -> bool {
        match self {
            Self::Batch { client, warm, size } => {
                let start = (i as usize * *size) % warm.len();
                let items = (0..*size)
                    .map(|k| unwrap_request(&warm[(start + k) % warm.len()]))
                    .collect();
                let reply = client
                    .batch_unwrap_key(keybroker::proto::BatchUnwrapKeyRequest { items })
                    .await;
                used(*size as u64);
                reply.is_ok_and(|r| {
                    r.get_ref().results.len() == *size
                        && r.get_ref().results.iter().all(|item| {
                            item.response
                                .as_ref()
                                .is_some_and(|u| u.plaintext.len() == 32)
                        })
                })
            }
            Self::Generate(client, tenants) => {
                let tenant = &tenants[i as usize % tenants.len()];
                let reply = client.generate_data_key(generate_request(tenant)).await;
                used(1);
                reply.is_ok_and(|r| r.get_ref().plaintext.len() == 32)
            }
            Self::Http {
                client,
                token,
                requests,
            } => {
                let (url, body) = &requests[i as usize % requests.len()];
                match client
                    .post(url)
                    .header("X-Vault-Token", &**token)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
            Self::Floor(client, keys) => {
                let key = &keys[i as usize % keys.len()];
                client
                    .get(GetRequest {
                        tenant_id: key.tenant.to_string(),
                        key: key.key.clone(),
                        context: context(),
                    })
                    .await
                    .is_ok_and(|r| r.get_ref().value.len() == 32)
            }
            Self::Broker {
                client,
                warm,
                cold,
                next_cold,
                hit_ratio,
            } => {
                // A fixed pseudo-random pattern (golden-ratio sequence).
                let cold_pick = *hit_ratio < 1.0
                    && ((i as f64 * 0.618_033_988_75).fract() >= *hit_ratio)
                    && !cold.is_empty();
                let key = if cold_pick {
                    let n = next_cold.fetch_add(1, Ordering::Relaxed) as usize;
                    &cold[n % cold.len()]
                } else {
                    &warm[i as usize % warm.len()]
                };
                let reply = client.unwrap_key(unwrap_request(key)).await;
                used(1);
                reply.is_ok_and(|r| r.get_ref().plaintext.len() == 32)
            }
        }
    }
}
