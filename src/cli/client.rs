//! Data-plane client commands: generate, wrap, unwrap, rewrap, describe,
//! health, and the dispatch of every client command.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::Command;
use super::connection::{ServerArg, TenantChannel, channel};
use super::output::{Answer, key_json};
use crate::proto::{self, key_broker_client::KeyBrokerClient};

#[derive(Debug, clap::Args)]
pub(super) struct Target {
    #[command(flatten)]
    pub(super) server: ServerArg,
    /// Tenant id.
    #[arg(long)]
    pub(super) tenant: String,
    /// Encryption context entry, repeatable: --context table=orders.
    #[arg(long = "context", value_parser = parse_context_entry)]
    pub(super) context: Vec<(String, String)>,
    /// Why the key is used: customer_initiated, platform_operation,
    /// customer_support, platform_review, legal_request or migration. The
    /// authorization policy decides which reasons this caller may claim;
    /// the tenant's access policy, which it accepts.
    #[arg(long, value_parser = crate::access::Reason::parse)]
    pub(super) reason: Option<crate::access::Reason>,
    /// The reason's detail: the ticket, case or request id (required for
    /// customer_support, platform_review and legal_request).
    #[arg(long, requires = "reason")]
    pub(super) reason_detail: Option<String>,
}

/// The request's justification from `--reason` and `--reason-detail`.
pub(super) fn justification(
    reason: Option<crate::access::Reason>,
    detail: Option<&str>,
) -> Option<proto::AccessJustification> {
    reason.map(|reason| proto::AccessJustification {
        reason: reason.to_proto(),
        detail: detail.unwrap_or_default().to_owned(),
    })
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum KeySpecArg {
    #[value(name = "aes-256")]
    Aes256,
    #[value(name = "aes-128")]
    Aes128,
}

pub(super) fn parse_context_entry(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

pub(super) async fn connect(
    server: &ServerArg,
    tenant: &str,
) -> anyhow::Result<KeyBrokerClient<TenantChannel>> {
    Ok(KeyBrokerClient::new(channel(server, tenant).await?))
}

pub(super) fn decode_b64(flag: &str, text: &str) -> anyhow::Result<Vec<u8>> {
    B64.decode(text.trim())
        .map_err(|e| anyhow::anyhow!("--{flag} is not valid base64: {e}"))
}

/// Items per batch RPC the CLI sends (the server's maximum).
const BATCH: usize = 256;

/// A failed batch item: its gRPC code and message.
fn item_error(status: Option<&tonic_types::Status>) -> Value {
    let status = status.cloned().unwrap_or_default();
    json!({
        "error": {
            "code": format!("{:?}", tonic::Code::from(status.code)),
            "message": status.message,
        }
    })
}

pub(super) async fn run(command: Command) -> anyhow::Result<()> {
    let output = match command {
        Command::Generate { target, key_spec } => {
            let mut client = connect(&target.server, &target.tenant).await?;
            let resp = client
                .generate_data_key(proto::GenerateDataKeyRequest {
                    tenant_id: target.tenant,
                    context: target.context.into_iter().collect(),
                    key_spec: match key_spec {
                        KeySpecArg::Aes256 => proto::KeySpec::Aes256,
                        KeySpecArg::Aes128 => proto::KeySpec::Aes128,
                    }
                    .into(),
                    justification: justification(target.reason, target.reason_detail.as_deref()),
                })
                .await
                .answer()?;
            json!({
                "plaintext": B64.encode(&resp.plaintext),
                "wrapped_key": B64.encode(&resp.wrapped_key),
                "key": key_json(resp.key.as_ref()),
            })
        }
        Command::Wrap { target, plaintext } => {
            let plaintext = zeroize::Zeroizing::new(decode_b64("plaintext", &plaintext)?);
            let mut client = connect(&target.server, &target.tenant).await?;
            let resp = client
                .wrap_key(proto::WrapKeyRequest {
                    tenant_id: target.tenant,
                    context: target.context.into_iter().collect(),
                    plaintext: plaintext.to_vec(),
                    justification: justification(target.reason, target.reason_detail.as_deref()),
                })
                .await
                .answer()?;
            json!({
                "wrapped_key": B64.encode(&resp.wrapped_key),
                "key": key_json(resp.key.as_ref()),
            })
        }
        Command::Unwrap {
            target,
            wrapped_key,
        } => {
            let wrapped_key = decode_b64("wrapped-key", &wrapped_key)?;
            let mut client = connect(&target.server, &target.tenant).await?;
            let resp = client
                .unwrap_key(proto::UnwrapKeyRequest {
                    tenant_id: target.tenant,
                    context: target.context.into_iter().collect(),
                    wrapped_key: wrapped_key.into(),
                    justification: justification(target.reason, target.reason_detail.as_deref()),
                })
                .await
                .answer()?;
            json!({
                "plaintext": B64.encode(&resp.plaintext),
                "key": key_json(resp.key.as_ref()),
                "rewrap_recommended": resp.rewrap_recommended,
            })
        }
        Command::BatchUnwrap { target } => {
            let mut client = connect(&target.server, &target.tenant).await?;
            let context: std::collections::BTreeMap<String, String> =
                target.context.into_iter().collect();
            let lines: Vec<String> = std::io::stdin().lines().collect::<Result<_, _>>()?;
            let mut items = Vec::new();
            for (n, line) in lines
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                items.push(proto::UnwrapKeyRequest {
                    tenant_id: target.tenant.clone(),
                    context: context.clone(),
                    wrapped_key: decode_b64(&format!("wrapped key on line {}", n + 1), line)?
                        .into(),
                    justification: justification(target.reason, target.reason_detail.as_deref()),
                });
            }
            let mut results = Vec::new();
            for chunk in items.chunks(BATCH) {
                let resp = client
                    .batch_unwrap_key(proto::BatchUnwrapKeyRequest {
                        items: chunk.to_vec(),
                    })
                    .await
                    .answer()?;
                results.extend(resp.results.iter().map(|r| match &r.response {
                    Some(ok) => json!({
                        "plaintext": B64.encode(&ok.plaintext),
                        "key": key_json(ok.key.as_ref()),
                        "rewrap_recommended": ok.rewrap_recommended,
                    }),
                    None => item_error(r.status.as_ref()),
                }));
            }
            json!({ "results": results })
        }
        Command::BatchGenerate { target, count } => {
            let mut client = connect(&target.server, &target.tenant).await?;
            let item = proto::GenerateDataKeyRequest {
                tenant_id: target.tenant,
                context: target.context.into_iter().collect(),
                key_spec: proto::KeySpec::Aes256.into(),
                justification: justification(target.reason, target.reason_detail.as_deref()),
            };
            let mut results = Vec::new();
            let mut left = count;
            while left > 0 {
                let n = left.min(BATCH);
                let resp = client
                    .batch_generate_data_key(proto::BatchGenerateDataKeyRequest {
                        items: vec![item.clone(); n],
                    })
                    .await
                    .answer()?;
                results.extend(resp.results.iter().map(|r| match &r.response {
                    Some(ok) => json!({
                        "plaintext": B64.encode(&ok.plaintext),
                        "wrapped_key": B64.encode(&ok.wrapped_key),
                        "key": key_json(ok.key.as_ref()),
                    }),
                    None => item_error(r.status.as_ref()),
                }));
                left -= n;
            }
            json!({ "results": results })
        }
        Command::Rewrap {
            target,
            out: Some(out),
            ..
        } => {
            let context = target.context.into_iter().collect();
            let client = connect(&target.server, &target.tenant).await?;
            let justification = justification(target.reason, target.reason_detail.as_deref());
            super::bulk::rewrap_all(client, &target.tenant, &context, justification, &out).await?
        }
        Command::Rewrap {
            target,
            wrapped_key,
            out: None,
        } => {
            let wrapped_key = decode_b64("wrapped-key", &wrapped_key.unwrap_or_default())?;
            let mut client = connect(&target.server, &target.tenant).await?;
            let resp = client
                .rewrap_key(proto::RewrapKeyRequest {
                    tenant_id: target.tenant,
                    context: target.context.into_iter().collect(),
                    wrapped_key,
                    justification: justification(target.reason, target.reason_detail.as_deref()),
                })
                .await
                .answer()?;
            json!({
                "wrapped_key": B64.encode(&resp.wrapped_key),
                "key": key_json(resp.key.as_ref()),
                "previous_key": key_json(resp.previous_key.as_ref()),
            })
        }
        Command::Health { server, service } => {
            let mut client =
                tonic_health::pb::health_client::HealthClient::new(channel(&server, "").await?);
            let status = client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.clone(),
                })
                .await?
                .into_inner()
                .status();
            let serving = status == tonic_health::pb::health_check_response::ServingStatus::Serving;
            anyhow::ensure!(serving, "service {service:?} is {}", status.as_str_name());
            json!({ "service": service, "status": status.as_str_name() })
        }
        Command::Describe { server, tenant } => {
            let mut client = connect(&server, &tenant).await?;
            let resp = client
                .describe_key(proto::DescribeKeyRequest { tenant_id: tenant })
                .await
                .answer()?;
            let bindings: Vec<Value> = resp
                .bindings
                .iter()
                .map(|b| {
                    json!({
                        "name": b.name,
                        "provider": b.provider().as_str_name(),
                        "key_reference": b.key_reference,
                        "state": b.state().as_str_name(),
                        "state_reason": b.state_reason,
                        "primary": b.primary,
                        "current_key_version": b.current_key_version,
                    })
                })
                .collect();
            json!({
                "tenant_id": resp.tenant_id,
                "uses_platform_key": resp.uses_platform_key,
                "primary": key_json(resp.primary.as_ref()),
                "bindings": bindings,
            })
        }
        Command::Admin { server, command } => super::admin::run(&server, command).await?,
        Command::Serve(_)
        | Command::CheckConfig(_)
        | Command::Keyring { .. }
        | Command::Registry { .. } => {
            anyhow::bail!("not a client command")
        }
    };
    println!("{output}");
    Ok(())
}
