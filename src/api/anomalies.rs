//! `/api/v1/anomalies`: recorded anomaly episodes, newest first, filtered and paginated.

use hyper::StatusCode;
use serde_json::json;

use super::{check_range, detector_name, json, Api, ApiError, Params, Reply};
use crate::registry::AnomalyQuery;

/// Query parameters of `GET /api/v1/anomalies`, besides `match[LABEL]`.
pub(super) const PARAMS: &[&str] = &["detector", "from", "to", "limit", "before_id"];

/// The registry query the parameters ask for.
pub(super) fn query(params: &Params) -> Result<AnomalyQuery, ApiError> {
    let detector = params
        .text("detector")
        .map(|d| detector_name("detector", d).map(|n| n.0))
        .transpose()?;
    let from = params.time("from")?;
    let to = params.time("to")?;
    check_range(from, to)?;
    let limit = params.limit()?;
    let query = AnomalyQuery {
        detector,
        matchers: params.matchers.clone(),
        from,
        to,
        before_id: params.int("before_id", 1, i64::MAX)?,
        limit,
    };
    Ok(query)
}

pub(super) async fn list(api: &Api, params: &Params) -> Reply {
    let query = query(params)?;
    let limit = query.limit;
    let rows = api
        .registry
        .anomalies(&query)
        .await
        .map_err(ApiError::from)?;
    // A full page may have more behind it; a short one is the last.
    let next = if rows.len() as i64 >= limit {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok(json(
        StatusCode::OK,
        &json!({ "anomalies": rows, "next_before_id": next }),
    ))
}
