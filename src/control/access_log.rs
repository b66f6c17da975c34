//! Reading a tenant's key access log (written by `access_log.rs`).

use super::validation::validate_tenant;
use super::{Admin, AdminError};
use crate::registry::access_log::{AccessQuery, AccessRecord};

/// Most records one page holds.
pub const MAX_PAGE: u32 = 10_000;

/// One page of a tenant's access log, oldest first, and the token of the
/// next (None on the last page).
#[derive(Debug)]
pub struct AccessPage {
    pub records: Vec<AccessRecord>,
    pub next: Option<String>,
}

/// A page token: where the previous page stopped (time, row id).
fn parse_token(token: &str) -> Result<Option<(i64, i64)>, AdminError> {
    if token.is_empty() {
        return Ok(None);
    }
    let parsed = token
        .split_once('.')
        .and_then(|(t, id)| Some((t.parse().ok()?, id.parse().ok()?)));
    parsed.map(Some).ok_or_else(|| {
        AdminError::InvalidArgument(
            "page_token is not one this server returned; start again without it".into(),
        )
    })
}

impl Admin {
    /// The tenant's access log in `query`'s range (its `after` is taken
    /// from `page_token`). The tenant need not exist any more: a deleted
    /// tenant's log is kept for its retention.
    pub async fn key_access(
        &self,
        mut query: AccessQuery,
        page_token: &str,
    ) -> Result<AccessPage, AdminError> {
        validate_tenant(&query.tenant_id)?;
        if query.from_ms >= query.to_ms {
            return Err(AdminError::InvalidArgument(
                "start_time must be before end_time".into(),
            ));
        }
        query.after = parse_token(page_token)?;
        query.limit = match query.limit {
            0 => 1000,
            n => n.min(MAX_PAGE),
        };
        let rows = self.registry().access(&query).await?;
        let next = (rows.len() == query.limit as usize)
            .then(|| rows.last().map(|(id, r)| format!("{}.{id}", r.time_ms)))
            .flatten();
        Ok(AccessPage {
            records: rows.into_iter().map(|(_, r)| r).collect(),
            next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_garbage() {
        assert_eq!(parse_token("").unwrap(), None);
        assert_eq!(
            parse_token("1700000000000.42").unwrap(),
            Some((1_700_000_000_000, 42))
        );
        for bad in ["x", "1.", ".1", "1.2.3", "a.b"] {
            assert!(parse_token(bad).is_err(), "{bad}");
        }
    }
}
