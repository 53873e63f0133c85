//! `/api/v1/maintenance-windows`: periods left out of training and of anomaly recording.

use hyper::StatusCode;
use serde_json::json;

use super::{
    check_range, detector_name, json, label_name, no_content, no_nul, Api, ApiError, Params, Reply,
    MAX_TIMESTAMP,
};
use crate::registry::NewWindow;

/// Query parameters of `GET /api/v1/maintenance-windows`.
pub(super) const PARAMS: &[&str] = &["from", "to"];

/// The `[from, to]` range the parameters ask for, open ends filled in.
pub(super) fn range(params: &Params) -> Result<(i64, i64), ApiError> {
    let from = params.time("from")?;
    let to = params.time("to")?;
    check_range(from, to)?;
    Ok((from.unwrap_or(0), to.unwrap_or(MAX_TIMESTAMP)))
}

pub(super) async fn list(api: &Api, params: &Params) -> Reply {
    let (from, to) = range(params)?;
    let windows = api.registry.windows(from, to).await?;
    Ok(json(StatusCode::OK, &json!({ "windows": windows })))
}

pub(super) fn validate(new: &NewWindow) -> Result<(), ApiError> {
    for (field, ts) in [("starts_at", new.starts_at), ("ends_at", new.ends_at)] {
        if !crate::timestamp::in_range(ts) {
            return Err(ApiError::bad_request(format!(
                "{field}: must be Unix seconds between 0 and {MAX_TIMESTAMP}, got {ts}"
            )));
        }
    }
    if new.ends_at <= new.starts_at {
        return Err(ApiError::bad_request(format!(
            "ends_at: must be after starts_at ({} <= {})",
            new.ends_at, new.starts_at
        )));
    }
    if new.reason.trim().is_empty() {
        return Err(ApiError::bad_request("reason: must not be empty"));
    }
    no_nul("reason", &new.reason)?;
    if let Some(d) = &new.detector {
        detector_name("detector", d)?;
    }
    for (label, value) in &new.matchers {
        let field = format!("matchers.{label}");
        label_name("matchers", label)?;
        no_nul(&field, value)?;
    }
    Ok(())
}

pub(super) async fn create(api: &Api, new: NewWindow) -> Reply {
    validate(&new)?;
    let window = api.registry.create_window(&new).await?;
    Ok(json(StatusCode::CREATED, &window))
}

/// The window id from the path.
pub(super) fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request(format!("id: expected an integer, got {id:?}")))
}

pub(super) async fn delete(api: &Api, id: &str) -> Reply {
    let id = parse_id(id)?;
    if !api.registry.delete_window(id).await? {
        return Err(ApiError::not_found(format!(
            "no maintenance window with id {id}"
        )));
    }
    Ok(no_content())
}
