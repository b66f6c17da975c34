//! `keybroker.v1.KeyBroker`: converts messages to and from the data plane.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::call;
use crate::api::convert::{hierarchy_to_proto, key_info, key_state, timestamp};
use crate::broker::{Broker, BrokerError, Miss, Reason, SharedViews};
use crate::context::{Context, TenantId};
use crate::proto::{self, key_broker_server::KeyBroker};
use crate::secret::SecretBytes;

#[derive(Debug, Clone)]
pub(crate) struct KeyBrokerApi {
    broker: Arc<Broker>,
    observers: Arc<crate::api::Observers>,
}

impl KeyBrokerApi {
    pub(crate) fn new(broker: Arc<Broker>, observers: Arc<crate::api::Observers>) -> Self {
        Self { broker, observers }
    }
}

/// The reason a request claims. Checked when the call was authorized
/// (`call::serve`): an unknown number never gets this far.
fn reason(justification: Option<&proto::AccessJustification>) -> Reason {
    justification
        .and_then(|j| Reason::from_proto(j.reason))
        .unwrap_or_default()
}

/// The request's tenant id, checked here once for the whole call.
fn tenant(id: String) -> Result<TenantId, Status> {
    TenantId::parse(id).map_err(|e| BrokerError::from(e).into())
}

fn context(map: std::collections::BTreeMap<String, String>) -> Result<Context, Status> {
    Context::new(map).map_err(|e| BrokerError::from(e).into())
}

/// An UnwrapKey request whose context is validated, for the path that may
/// wait (a key not in the cache).
struct PreparedUnwrap {
    tenant_id: TenantId,
    context: Context,
    wrapped_key: bytes::Bytes,
    reason: Reason,
    miss: Miss,
}

fn unwrap_response(unwrapped: crate::broker::Unwrapped) -> proto::UnwrapKeyResponse {
    proto::UnwrapKeyResponse {
        plaintext: crate::cache::plaintext_bytes(unwrapped.key),
        key: Some(key_info(unwrapped.info)),
        rewrap_recommended: unwrapped.rewrap_recommended,
    }
}

impl KeyBrokerApi {
    async fn generate_one(
        &self,
        req: proto::GenerateDataKeyRequest,
        shared: Option<&SharedViews>,
    ) -> Result<proto::GenerateDataKeyResponse, Status> {
        let len = match proto::KeySpec::try_from(req.key_spec) {
            Ok(proto::KeySpec::Unspecified | proto::KeySpec::Aes256) => 32,
            Ok(proto::KeySpec::Aes128) => 16,
            Err(_) => {
                return Err(BrokerError::InvalidRequest(format!(
                    "unknown key_spec {}; use KEY_SPEC_AES_256 or KEY_SPEC_AES_128",
                    req.key_spec
                ))
                .into());
            }
        };
        let tenant_id = tenant(req.tenant_id)?;
        let generated = self
            .broker
            .generate(
                &tenant_id,
                &context(req.context)?,
                len,
                reason(req.justification.as_ref()),
                shared,
            )
            .await?;
        Ok(proto::GenerateDataKeyResponse {
            plaintext: generated.plaintext.into_response_bytes(),
            wrapped_key: generated.wrapped_key,
            key: Some(key_info(generated.key)),
        })
    }

    /// An UnwrapKey (single or batch item) answered at once (a cached key,
    /// or a request refused before any lookup), or handed on, its context
    /// validated, to [`KeyBrokerApi::unwrap_prepared`].
    fn unwrap_at_once(
        &self,
        req: proto::UnwrapKeyRequest,
        shared: Option<&SharedViews>,
    ) -> Result<Result<proto::UnwrapKeyResponse, Status>, Box<PreparedUnwrap>> {
        let (tenant_id, context) =
            match tenant(req.tenant_id).and_then(|t| Ok((t, context(req.context)?))) {
                Ok(checked) => checked,
                Err(status) => return Ok(Err(status)),
            };
        let reason = reason(req.justification.as_ref());
        match self
            .broker
            .unwrap_cached(&tenant_id, &context, &req.wrapped_key, reason, shared)
        {
            Ok(result) => Ok(result.map(unwrap_response).map_err(Status::from)),
            // Boxed: a miss is the cold path, and the hit's result stays small.
            Err(miss) => Err(Box::new(PreparedUnwrap {
                tenant_id,
                context,
                wrapped_key: req.wrapped_key,
                reason,
                miss,
            })),
        }
    }

    async fn unwrap_prepared(
        &self,
        req: Box<PreparedUnwrap>,
        shared: Option<&SharedViews>,
    ) -> Result<proto::UnwrapKeyResponse, Status> {
        let unwrapped = self
            .broker
            .unwrap_missed(
                &req.tenant_id,
                &req.context,
                &req.wrapped_key,
                req.reason,
                req.miss,
                shared,
            )
            .await?;
        Ok(unwrap_response(unwrapped))
    }

    async fn rewrap_one(
        &self,
        req: proto::RewrapKeyRequest,
        shared: Option<&SharedViews>,
    ) -> Result<proto::RewrapKeyResponse, Status> {
        let tenant_id = tenant(req.tenant_id)?;
        let rewrapped = self
            .broker
            .rewrap(
                &tenant_id,
                &context(req.context)?,
                &req.wrapped_key,
                reason(req.justification.as_ref()),
                shared,
            )
            .await?;
        Ok(proto::RewrapKeyResponse {
            wrapped_key: rewrapped.wrapped_key,
            key: Some(key_info(rewrapped.key)),
            previous_key: Some(key_info(rewrapped.previous_key)),
        })
    }
}

#[tonic::async_trait]
impl KeyBroker for KeyBrokerApi {
    async fn generate_data_key(
        &self,
        request: Request<proto::GenerateDataKeyRequest>,
    ) -> Result<Response<proto::GenerateDataKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| self.generate_one(req, None)).await
    }

    async fn wrap_key(
        &self,
        request: Request<proto::WrapKeyRequest>,
    ) -> Result<Response<proto::WrapKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let tenant_id = tenant(req.tenant_id)?;
            let context = context(req.context)?;
            let plaintext = SecretBytes::new(req.plaintext);
            let wrapped = self
                .broker
                .wrap(
                    &tenant_id,
                    &context,
                    &plaintext,
                    reason(req.justification.as_ref()),
                )
                .await?;
            Ok(proto::WrapKeyResponse {
                wrapped_key: wrapped.wrapped_key,
                key: Some(key_info(wrapped.key)),
            })
        })
        .await
    }

    /// By hand, not `async fn`: a cached key is answered before any future
    /// exists, and the boxed future is then only the ready answer. A miss
    /// boxes the path that waits.
    fn unwrap_key<'life0, 'async_trait>(
        &'life0 self,
        request: Request<proto::UnwrapKeyRequest>,
    ) -> Pin<
        Box<
            dyn Future<Output = Result<Response<proto::UnwrapKeyResponse>, Status>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        // One request shares no views (nothing to remember them for).
        match call::serve_now(&self.observers, request, |req| {
            self.unwrap_at_once(req, None)
        }) {
            call::Served::Answered(answer) => Box::pin(std::future::ready(answer)),
            call::Served::Parked(parked) => Box::pin(parked.serve(&self.observers, |prepared| {
                self.unwrap_prepared(prepared, None)
            })),
        }
    }

    async fn rewrap_key(
        &self,
        request: Request<proto::RewrapKeyRequest>,
    ) -> Result<Response<proto::RewrapKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| self.rewrap_one(req, None)).await
    }

    async fn batch_generate_data_key(
        &self,
        request: Request<proto::BatchGenerateDataKeyRequest>,
    ) -> Result<Response<proto::BatchGenerateDataKeyResponse>, Status> {
        let request = request.map(|r| r.items);
        let shared = SharedViews::default();
        let results = call::serve_batch(&self.observers, request, Err, |req| {
            self.generate_one(req, Some(&shared))
        })
        .await?
        .into_iter()
        .map(|r| proto::BatchGenerateDataKeyResult {
            status: Some(call::item_status(&r.as_ref().map(|_| ()))),
            response: r.ok(),
        })
        .collect();
        Ok(Response::new(proto::BatchGenerateDataKeyResponse {
            results,
        }))
    }

    async fn batch_unwrap_key(
        &self,
        request: Request<proto::BatchUnwrapKeyRequest>,
    ) -> Result<Response<proto::BatchUnwrapKeyResponse>, Status> {
        let request = request.map(|r| r.items);
        let shared = SharedViews::default();
        let results = call::serve_batch(
            &self.observers,
            request,
            |req| self.unwrap_at_once(req, Some(&shared)),
            |req| self.unwrap_prepared(req, Some(&shared)),
        )
        .await?
        .into_iter()
        .map(|r| proto::BatchUnwrapKeyResult {
            status: Some(call::item_status(&r.as_ref().map(|_| ()))),
            response: r.ok(),
        })
        .collect();
        Ok(Response::new(proto::BatchUnwrapKeyResponse { results }))
    }

    async fn batch_rewrap_key(
        &self,
        request: Request<proto::BatchRewrapKeyRequest>,
    ) -> Result<Response<proto::BatchRewrapKeyResponse>, Status> {
        let request = request.map(|r| r.items);
        let shared = SharedViews::default();
        let results = call::serve_batch(&self.observers, request, Err, |req| {
            self.rewrap_one(req, Some(&shared))
        })
        .await?
        .into_iter()
        .map(|r| proto::BatchRewrapKeyResult {
            status: Some(call::item_status(&r.as_ref().map(|_| ()))),
            response: r.ok(),
        })
        .collect();
        Ok(Response::new(proto::BatchRewrapKeyResponse { results }))
    }

    async fn describe_key(
        &self,
        request: Request<proto::DescribeKeyRequest>,
    ) -> Result<Response<proto::DescribeKeyResponse>, Status> {
        call::serve(&self.observers, request, |req| async move {
            let described = self.broker.describe(&tenant(req.tenant_id)?).await?;
            Ok(proto::DescribeKeyResponse {
                tenant_id: described.tenant_id,
                uses_platform_key: described.uses_platform_key,
                primary: Some(key_info(described.primary)),
                bindings: described
                    .bindings
                    .into_iter()
                    .map(|b| proto::KeyBindingStatus {
                        name: b.name.to_string(),
                        provider: proto::Provider::from(b.provider).into(),
                        key_reference: b.key_reference,
                        state: key_state(b.state).into(),
                        state_reason: b.state_reason,
                        primary: b.primary,
                        current_key_version: b.current_key_version,
                        last_check_time: b.last_checked_ms.map(timestamp),
                    })
                    .collect(),
                key_hierarchy: hierarchy_to_proto(described.hierarchy).into(),
                tenant_key_version: described.tenant_key_version,
                reencryption: Some(proto::Reencryption {
                    in_progress: described.reencrypt_to.is_some(),
                    target: described.reencrypt_to.unwrap_or_default(),
                    versions_done: described.versions_done,
                    versions_total: described.versions_total,
                }),
            })
        })
        .await
    }
}
