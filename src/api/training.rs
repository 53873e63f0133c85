//! `/api/v1/detectors/{name}/retrain` and `/api/v1/training-requests`: the retraining queue
//! that `mad train --watch` works through.

use hyper::StatusCode;
use serde_json::json;

use super::{detector_name, detectors, json, Api, ApiError, Params, Reply};

/// Query parameters of `GET /api/v1/training-requests`.
pub(super) const PARAMS: &[&str] = &["limit"];

pub(super) async fn retrain(api: &Api, name: &str) -> Reply {
    let name = detector_name("name", name)?.0;
    if !detectors::exists(api, &name).await? {
        return Err(ApiError::not_found(format!(
            "no detector {name:?} in the config file or the database"
        )));
    }
    let request = api.registry.request_training(&name).await?;
    Ok(json(StatusCode::ACCEPTED, &request))
}

pub(super) async fn list(api: &Api, params: &Params) -> Reply {
    let requests = api.registry.training_requests(params.limit()?).await?;
    Ok(json(StatusCode::OK, &json!({ "requests": requests })))
}
