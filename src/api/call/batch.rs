//! Batch RPCs: every item through the same checks as a single call, the
//! items answered at once in place, the others awaited together.

use super::*;

/// Most items one batch RPC carries (see broker.proto).
pub(crate) const MAX_BATCH_ITEMS: usize = 256;

/// A batch RPC: every item goes through what [`serve`] does for one
/// request (tenant check, handler, one audit record); the batch fails as a
/// whole only when it is empty or too large. One metrics sample for the
/// batch. The records of the items answered at once are written in one
/// write; the others', as each finishes.
///
/// `at_once` answers an item without waiting when it can (a cached key),
/// or hands it on, prepared, to `handler`, whose futures run concurrently.
/// Most items of a warm batch never become a future: building, moving and
/// polling a future per item cost more than serving a cached one.
pub(crate) async fn serve_batch<Item, Next, Resp, Fut>(
    observers: &Observers,
    request: Request<Vec<Item>>,
    at_once: impl Fn(Item) -> Result<Result<Resp, Status>, Next>,
    handler: impl Fn(Next) -> Fut,
) -> Result<Vec<Result<Resp, Status>>, Status>
where
    Item: Scoped,
    Resp: Audited,
    Fut: Future<Output = Result<Resp, Status>>,
{
    let Some(ctx) = request.extensions().get::<CallContext>().cloned() else {
        return Err(AccessError::NoContext.into());
    };
    let (metadata, _, items) = request.into_parts();
    observers.metrics.affinity(
        Affinity::of(
            &observers.affinity_header,
            &metadata,
            items.iter().map(Scoped::tenant_id),
        )
        .as_str(),
    );
    if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
        let status = Status::invalid_argument(format!(
            "a batch holds 1 to {MAX_BATCH_ITEMS} items (and at most 64 KiB); this one holds {}",
            items.len()
        ));
        observers
            .metrics
            .rpc(&ctx.method, status.code(), None, ctx.started.elapsed());
        return Err(status);
    }
    let audit = &observers.audit;
    let mut results: Vec<Option<Result<Response<Resp>, Status>>> = Vec::with_capacity(items.len());
    let mut waiting = Vec::new();
    // The records of the items answered here are written together, in one
    // write: a record each, not a write each.
    let mut gathered = audit.gather();
    for item in items {
        match answer_at_once(&mut gathered, &ctx, item, &at_once) {
            AtOnce::Answered(answer) => results.push(Some(answer)),
            AtOnce::Waits(facts, next) => {
                waiting.push((results.len(), facts, next));
                results.push(None);
            }
        }
    }
    if let Err(err) = gathered.commit() {
        tracing::error!(error = %err, request_id = ctx.request_id.as_deref().unwrap_or_default(), "audit records of a batch not written");
        if audit.fail_closed() {
            // As a single call: no answer without its record.
            let refusal = Status::from(AccessError::AuditUnavailable(err.to_string()));
            for answer in results.iter_mut().flatten() {
                *answer = Err(refusal.clone());
            }
        }
    }
    if !waiting.is_empty() {
        let (ctx, handler) = (&ctx, &handler);
        let limit = observers.request_timeout;
        // Each item under the deadline: one that outlives it answers
        // DEADLINE_EXCEEDED, with its record, and the others still answer.
        let answers = join_in_place(waiting.into_iter().map(|(at, facts, next)| async move {
            (at, run(audit, ctx, limit, facts, next, handler).await)
        }))
        .await;
        for (at, answer) in answers {
            results[at] = Some(answer);
        }
    }
    observers
        .metrics
        .rpc(&ctx.method, Code::Ok, None, ctx.started.elapsed());
    Ok(results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| Err(Status::internal("batch item left unanswered")))
                .map(Response::into_inner)
        })
        .collect())
}

/// Every future of `futures`, concurrently, in order, without a task per
/// future: `join_all` polls up to 30 futures in place (one allocation) and
/// boxes each one beyond that, so a batch is joined in chunks of 30.
pub(super) async fn join_in_place<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    const IN_PLACE: usize = 30;
    let mut futures = futures.peekable();
    let mut chunks = Vec::new();
    while futures.peek().is_some() {
        let chunk: Vec<F> = futures.by_ref().take(IN_PLACE).collect();
        chunks.push(futures::future::join_all(chunk));
    }
    futures::future::join_all(chunks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// A per-item answer of a batch as `google.rpc.Status`, with the details
/// (`ErrorInfo`) the single RPC's status would carry.
pub(crate) fn item_status(result: &Result<(), &Status>) -> tonic_types::Status {
    match result {
        Ok(()) => tonic_types::Status {
            code: 0,
            message: String::new(),
            details: Vec::new(),
        },
        Err(status) => {
            use prost::Message as _;
            tonic_types::Status::decode(status.details())
                .ok()
                .filter(|s| s.code == status.code() as i32)
                .unwrap_or_else(|| tonic_types::Status {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    details: Vec::new(),
                })
        }
    }
}
