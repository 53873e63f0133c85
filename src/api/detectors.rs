//! `/api/v1/detectors`: the config file's detectors (read-only) and the database's (editable).

use hyper::StatusCode;
use serde_json::{json, Map, Value};

use super::{detector_name, json, no_content, Api, ApiError, Reply};
use crate::config::{Detector, Queries};
use crate::source::SourceError;

fn duration(d: std::time::Duration) -> Value {
    humantime::format_duration(d).to_string().into()
}

/// A config-file detector with the same keys as in the YAML file.
fn config_spec(d: &Detector) -> Value {
    let mut spec = Map::new();
    match d.queries() {
        Queries::Single(q) => {
            spec.insert("query".into(), q.into());
        }
        Queries::Joined { inputs, join_on } => {
            let inputs: Map<String, Value> = inputs
                .iter()
                .map(|(name, q)| (name.0.clone(), q.0.clone().into()))
                .collect();
            spec.insert("inputs".into(), inputs.into());
            let join_on: Vec<Value> = join_on.iter().map(|l| l.0.clone().into()).collect();
            spec.insert("join_on".into(), join_on.into());
        }
    }
    spec.insert("step".into(), duration(d.step.0));
    spec.insert("window".into(), d.window.0.into());
    spec.insert("train_range".into(), duration(d.train_range.0));
    if let Some(i) = d.interval {
        spec.insert("interval".into(), duration(i.0));
    }
    if let Some(s) = d.staleness {
        spec.insert("staleness".into(), duration(s.0));
    }
    let t = &d.training;
    let mut training = Map::new();
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            training.insert(key.into(), v);
        }
    };
    set("hidden", t.hidden.map(Value::from));
    set("layers", t.layers.map(|l| Value::from(l.0)));
    set("dropout", t.dropout.map(|f| Value::from(f.0)));
    set("max_epochs", t.max_epochs.map(Value::from));
    set("patience", t.patience.map(Value::from));
    set("learning_rate", t.learning_rate.map(Value::from));
    set("seed", t.seed.map(Value::from));
    set("band_quantile", t.band_quantile.map(|f| Value::from(f.0)));
    set("band_margin", t.band_margin.map(Value::from));
    if !training.is_empty() {
        spec.insert("training".into(), training.into());
    }
    let mut episode = Map::new();
    if let Some(f) = d.episode.hold_for {
        episode.insert("for".into(), duration(f.0));
    }
    if let Some(q) = d.episode.quiet {
        episode.insert("quiet".into(), duration(q.0));
    }
    if !episode.is_empty() {
        spec.insert("episode".into(), episode.into());
    }
    spec.into()
}

fn entry(name: &str, source: &str, spec: Value, updated_at: Option<i64>) -> Value {
    json!({ "name": name, "source": source, "spec": spec, "updated_at": updated_at })
}

async fn stored(api: &Api, name: &str) -> Result<Option<Value>, ApiError> {
    Ok(api
        .registry
        .detectors()
        .await?
        .into_iter()
        .find(|d| d.name == name)
        .map(|d| entry(&d.name, "database", d.spec, Some(d.updated_at))))
}

pub(super) async fn list(api: &Api) -> Reply {
    let mut all: Vec<(String, Value)> = api
        .config
        .detectors
        .iter()
        .map(|d| {
            (
                d.name.0.clone(),
                entry(&d.name.0, "config", config_spec(d), None),
            )
        })
        .collect();
    for d in api.registry.detectors().await? {
        if !api.in_config(&d.name) {
            let shown = entry(&d.name, "database", d.spec, Some(d.updated_at));
            all.push((d.name, shown));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let detectors: Vec<Value> = all.into_iter().map(|(_, v)| v).collect();
    Ok(json(StatusCode::OK, &json!({ "detectors": detectors })))
}

/// The first string (key or value) holding a NUL, as a field path.
fn find_nul(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.to_string()),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let field = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            if k.contains('\0') {
                Some(field)
            } else {
                find_nul(v, &field)
            }
        }),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_nul(v, &format!("{path}[{i}]"))),
        _ => None,
    }
}

/// Checks `body` as a detector named `name`: the config file's rules, then the datasource's
/// opinion of the query. Returns the spec to store (the body without `name`).
async fn validate(api: &Api, name: &str, body: Value) -> Result<Value, ApiError> {
    // A body that is not an object is refused first, then a name the config file owns.
    if body.is_object() && api.in_config(name) {
        return Err(config_owned(name));
    }
    let (mut spec, detector) = check_spec(name, body)?;
    let queries: Vec<(String, &str)> = match detector.queries() {
        Queries::Single(q) => vec![("query".to_string(), q)],
        Queries::Joined { inputs, .. } => inputs
            .iter()
            .map(|(name, q)| (format!("inputs.{}", name.0), q.0.as_str()))
            .collect(),
    };
    for (field, query) in queries {
        match api.datasource.check_query(query).await {
            Ok(()) => {}
            Err(SourceError::Query { message, .. }) => {
                return Err(ApiError::bad_request(format!(
                    "{field}: the datasource rejected it: {message}"
                )))
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("cannot check the query with the datasource: {e}"),
                ))
            }
        }
    }
    spec.remove("name");
    Ok(Value::Object(spec))
}

/// The checks of [`validate`] that need neither the config file nor the datasource: `body` as a
/// detector named `name`. Returns the spec with `name` set, and the detector it describes.
pub(super) fn check_spec(
    name: &str,
    body: Value,
) -> Result<(Map<String, Value>, Detector), ApiError> {
    let Value::Object(mut spec) = body else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object with a detector's keys (name, query, step, ...)",
        ));
    };
    if let Some(field) = find_nul(&Value::Object(spec.clone()), "") {
        return Err(ApiError::bad_request(format!(
            "{field}: must not contain NUL characters"
        )));
    }
    match spec.get("name") {
        None => {}
        Some(Value::String(n)) if n == name => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "name: {other} does not match the detector {name:?} in the path"
            )))
        }
    }
    spec.insert("name".into(), name.into());
    let detector: Detector = serde_path_to_error::deserialize(Value::Object(spec.clone()))
        .map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            if field == "." || field.is_empty() {
                ApiError::bad_request(inner.to_string())
            } else {
                ApiError::bad_request(format!("{field}: {inner}"))
            }
        })?;
    let needed = detector.step.0.checked_mul(detector.window.0 as u32 * 4);
    if needed.is_none_or(|n| detector.train_range.0 < n) {
        return Err(ApiError::bad_request(format!(
            "train_range: {} holds fewer than 4 windows of {} points at step {}",
            humantime::format_duration(detector.train_range.0),
            detector.window.0,
            humantime::format_duration(detector.step.0)
        )));
    }
    if let Err((field, message)) = detector.check_queries() {
        return Err(ApiError::bad_request(format!("{field}: {message}")));
    }
    Ok((spec, detector))
}

/// The detector's name from a `POST /api/v1/detectors` body.
pub(super) fn name_of(body: &Value) -> Result<String, ApiError> {
    match body.get("name") {
        Some(Value::String(n)) => Ok(detector_name("name", n)?.0),
        Some(_) => Err(ApiError::bad_request("name: expected a string")),
        None if body.is_object() => Err(ApiError::bad_request("missing field `name`")),
        None => Err(ApiError::bad_request(
            "the body must be a JSON object with a detector's keys (name, query, step, ...)",
        )),
    }
}

fn config_owned(name: &str) -> ApiError {
    ApiError::conflict(format!(
        "detector {name:?} is defined in the config file; change it there"
    ))
}

pub(super) async fn create(api: &Api, body: Value) -> Reply {
    let name = name_of(&body)?;
    let spec = validate(api, &name, body).await?;
    if !api.registry.put_detector(&name, &spec, true).await? {
        return Err(ApiError::conflict(format!(
            "detector {name:?} already exists; use PUT /api/v1/detectors/{name} to change it"
        )));
    }
    let shown = stored(api, &name)
        .await?
        .unwrap_or_else(|| entry(&name, "database", spec, None));
    Ok(json(StatusCode::CREATED, &shown))
}

pub(super) async fn replace(api: &Api, name: &str, body: Value) -> Reply {
    let name = detector_name("name", name)?.0;
    let spec = validate(api, &name, body).await?;
    if !api.registry.put_detector(&name, &spec, false).await? {
        return Err(ApiError::not_found(format!(
            "no detector {name:?} in the database; create it with POST /api/v1/detectors"
        )));
    }
    let shown = stored(api, &name)
        .await?
        .unwrap_or_else(|| entry(&name, "database", spec, None));
    Ok(json(StatusCode::OK, &shown))
}

pub(super) async fn delete(api: &Api, name: &str) -> Reply {
    let name = detector_name("name", name)?.0;
    if api.in_config(&name) {
        return Err(config_owned(&name));
    }
    if !api.registry.delete_detector(&name).await? {
        return Err(ApiError::not_found(format!(
            "no detector {name:?} in the database"
        )));
    }
    Ok(no_content())
}

/// Whether `name` is a detector of the config file or the database.
pub(super) async fn exists(api: &Api, name: &str) -> Result<bool, ApiError> {
    if api.in_config(name) {
        return Ok(true);
    }
    Ok(api
        .registry
        .detectors()
        .await?
        .iter()
        .any(|d| d.name == name))
}
