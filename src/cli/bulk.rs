//! `keybroker rewrap` without `--wrapped-key`: moves every wrapped key read
//! from stdin (one base64 key per line, optionally a tab and a JSON object
//! of its context; `--context` otherwise) to the tenant's current key, through batch RPCs, several
//! batches in flight, output in input order.
//!
//! The output (`--out`) has one line per input line: the key to store from
//! now on (the rewrapped one, or the same one when it was already current),
//! or for a failure the original key, a tab and `error CODE: message`. It is
//! appended batch by batch, so a run that was killed resumes where it
//! stopped: the lines already in `--out` are skipped. Progress goes to
//! stderr on a terminal; a JSON summary goes to stdout.

use std::collections::BTreeMap;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::Path;

use super::connection::TenantChannel;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt as _;
use serde_json::{Value, json};

use super::output::Answer;
use crate::proto::{self, key_broker_client::KeyBrokerClient};

/// Items per batch RPC (the server's maximum).
const BATCH: usize = 256;
/// Batches in flight at once.
const IN_FLIGHT: usize = 4;

/// One input line, parsed.
struct Line {
    wrapped_b64: String,
    context: BTreeMap<String, String>,
}

fn parse_line(
    n: usize,
    text: &str,
    default_context: &BTreeMap<String, String>,
) -> anyhow::Result<Line> {
    let (key, context) = match text.split_once('\t') {
        Some((key, context)) => (
            key,
            serde_json::from_str::<BTreeMap<String, String>>(context).map_err(|e| {
                anyhow::anyhow!("line {n}: the context column is not a JSON object of strings: {e}")
            })?,
        ),
        None => (text, default_context.clone()),
    };
    Ok(Line {
        wrapped_b64: key.trim().to_owned(),
        context,
    })
}

/// What happened to one key.
enum Outcome {
    Moved(String),
    Current(String),
    Failed(String, String),
}

/// Moves the batch: unwrap first (cached keys cost nothing) to learn which
/// keys are already current, then rewrap the others.
async fn move_batch(
    mut client: KeyBrokerClient<TenantChannel>,
    (tenant, justification): (String, Option<proto::AccessJustification>),
    lines: Vec<Line>,
) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(lines.len());
    let mut items = Vec::new();
    for line in &lines {
        match B64.decode(&line.wrapped_b64) {
            Ok(wrapped_key) => {
                outcomes.push(None);
                items.push((
                    outcomes.len() - 1,
                    proto::UnwrapKeyRequest {
                        tenant_id: tenant.clone(),
                        context: line.context.clone(),
                        wrapped_key: wrapped_key.into(),
                        justification: justification.clone(),
                    },
                ));
            }
            Err(e) => outcomes.push(Some(Outcome::Failed(
                line.wrapped_b64.clone(),
                format!("InvalidArgument: not base64 ({e})"),
            ))),
        }
    }
    let fail = |status: Option<&tonic_types::Status>| {
        let s = status.cloned().unwrap_or_default();
        format!("{:?}: {}", tonic::Code::from(s.code), s.message)
    };
    if !items.is_empty() {
        let unwrapped = client
            .batch_unwrap_key(proto::BatchUnwrapKeyRequest {
                items: items.iter().map(|(_, i)| i.clone()).collect(),
            })
            .await
            .answer()?
            .results;
        let mut to_move = Vec::new();
        for ((slot, item), result) in items.into_iter().zip(unwrapped) {
            let original = lines[slot].wrapped_b64.clone();
            match &result.response {
                Some(r) if !r.rewrap_recommended => {
                    outcomes[slot] = Some(Outcome::Current(original));
                }
                Some(_) => to_move.push((slot, item)),
                None => {
                    outcomes[slot] = Some(Outcome::Failed(original, fail(result.status.as_ref())))
                }
            }
        }
        if !to_move.is_empty() {
            let rewrapped = client
                .batch_rewrap_key(proto::BatchRewrapKeyRequest {
                    items: to_move
                        .iter()
                        .map(|(_, i)| proto::RewrapKeyRequest {
                            tenant_id: i.tenant_id.clone(),
                            context: i.context.clone(),
                            wrapped_key: i.wrapped_key.to_vec(),
                            justification: i.justification.clone(),
                        })
                        .collect(),
                })
                .await
                .answer()?
                .results;
            for ((slot, _), result) in to_move.into_iter().zip(rewrapped) {
                outcomes[slot] = Some(match &result.response {
                    Some(r) => Outcome::Moved(B64.encode(&r.wrapped_key)),
                    None => Outcome::Failed(
                        lines[slot].wrapped_b64.clone(),
                        fail(result.status.as_ref()),
                    ),
                });
            }
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Outcome::Failed(String::new(), "Internal: no answer".into())))
        .collect())
}

/// Runs the bulk rewrap; the summary.
pub(super) async fn rewrap_all(
    client: KeyBrokerClient<TenantChannel>,
    tenant: &str,
    default_context: &BTreeMap<String, String>,
    justification: Option<proto::AccessJustification>,
    out: &Path,
) -> anyhow::Result<Value> {
    let mut input = Vec::new();
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line?;
        if !line.trim().is_empty() {
            input.push(parse_line(n + 1, &line, default_context)?);
        }
    }
    // Resume: the lines already in `out` were done by an earlier run.
    let done = match std::fs::File::open(out) {
        Ok(file) => std::io::BufReader::new(file).lines().count(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", out.display())),
    };
    anyhow::ensure!(
        done <= input.len(),
        "{} has {done} lines but the input only {}: not an output of this input",
        out.display(),
        input.len()
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let total = input.len();
    let remaining: Vec<Line> = input.into_iter().skip(done).collect();
    let mut batches = Vec::new();
    let mut iter = remaining.into_iter().peekable();
    while iter.peek().is_some() {
        batches.push(iter.by_ref().take(BATCH).collect::<Vec<_>>());
    }
    let progress = std::io::stderr().is_terminal();
    let mut results = futures::stream::iter(batches)
        .map(|batch| {
            let tenant = (tenant.to_owned(), justification.clone());
            move_batch(client.clone(), tenant, batch)
        })
        .buffered(IN_FLIGHT);
    let (mut moved, mut current, mut written) = (0u64, 0u64, done);
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(batch) = results.next().await {
        let mut text = String::new();
        for outcome in batch? {
            match outcome {
                Outcome::Moved(key) => {
                    moved += 1;
                    text.push_str(&key);
                }
                Outcome::Current(key) => {
                    current += 1;
                    text.push_str(&key);
                }
                Outcome::Failed(key, why) => {
                    let reason = why.split(':').next().unwrap_or_default().to_owned();
                    *failed.entry(reason).or_default() += 1;
                    text.push_str(&format!("{key}\terror {why}"));
                }
            }
            text.push('\n');
            written += 1;
        }
        // One write per batch: a kill leaves whole lines behind.
        file.write_all(text.as_bytes())?;
        file.flush()?;
        if progress {
            eprint!("\rrewrapped {written}/{total}");
        }
    }
    if progress {
        eprintln!();
    }
    Ok(json!({
        "out": out,
        "skipped_already_done": done,
        "moved": moved,
        "already_current": current,
        "failed": failed,
    }))
}
