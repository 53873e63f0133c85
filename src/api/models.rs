//! `/api/v1/models`: a detector's model versions, activation and rollback.

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{detector_name, json, no_nul, Api, ApiError, Params, Reply};
use crate::store::{StoreError, VersionInfo};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Activate {
    version: String,
}

fn version(v: &VersionInfo) -> Value {
    json!({
        "detector": v.detector,
        "version": v.version,
        "trained_at": v.trained_at,
        "size_bytes": v.size_bytes,
        "active": v.active,
    })
}

/// Query parameters of `GET /api/v1/models`.
pub(super) const PARAMS: &[&str] = &["detector"];

/// The required `detector` parameter.
pub(super) fn detector_param(params: &Params) -> Result<String, ApiError> {
    let name = params
        .text("detector")
        .ok_or_else(|| ApiError::bad_request("detector: required query parameter"))?;
    Ok(detector_name("detector", name)?.0)
}

pub(super) async fn list(api: &Api, params: &Params) -> Reply {
    let name = detector_param(params)?;
    let versions: Vec<Value> = api.models.list(&name).await?.iter().map(version).collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "detector": name, "versions": versions }),
    ))
}

/// The detector's name from the path, once the body is known to be usable.
pub(super) fn check_activate(detector: &str, body: &Activate) -> Result<String, ApiError> {
    let name = detector_name("detector", detector)?.0;
    if body.version.trim().is_empty() {
        return Err(ApiError::bad_request("version: must not be empty"));
    }
    no_nul("version", &body.version)?;
    Ok(name)
}

pub(super) async fn activate(api: &Api, detector: &str, body: Activate) -> Reply {
    let name = check_activate(detector, &body)?;
    let active = api.models.activate(&name, &body.version).await?;
    Ok(json(StatusCode::OK, &version(&active)))
}

pub(super) async fn rollback(api: &Api, detector: &str) -> Reply {
    let name = detector_name("detector", detector)?.0;
    match api.models.rollback(&name).await {
        Ok(active) => Ok(json(StatusCode::OK, &version(&active))),
        Err(StoreError::NotFound(message)) => Err(ApiError::conflict(format!(
            "nothing to roll back to: {message}"
        ))),
        Err(e) => Err(e.into()),
    }
}
